/**
 * FIFO range locks over the blocks of one layer. A request waits for every earlier request whose range
 * overlaps its own, so overlapping writes take effect in submission order and a read-modify-write of a
 * partial block cannot lose a neighbour's bytes. Bounded by the requests in flight (the NBD server
 * limits those per connection); overlap checks are linear in the number held, which stays small.
 */
import { assert } from "../errors";

export interface RangeLock {
  start: number;
  end: number;
  grant: (lock: RangeLock) => void;
  held: boolean;
}

/** FIFO range locks over blocks: a request waits for every earlier overlapping one. */
export class RangeLocks {
  private readonly locks: RangeLock[] = [];

  /** `grant` runs (possibly at once) with the lock when no earlier overlapping lock is held. */
  acquire(start: number, end: number, grant: (lock: RangeLock) => void): void {
    const lock: RangeLock = { start, end, grant, held: false };
    const blocked = this.locks.some((other) => other.start < end && start < other.end);
    this.locks.push(lock);
    if (!blocked) {
      lock.held = true;
      grant(lock);
    }
  }

  release(lock: RangeLock): void {
    const index = this.locks.indexOf(lock);
    assert(index >= 0 && lock.held, "release of a held lock");
    this.locks.splice(index, 1);
    // Grant waiters in order when nothing before them overlaps. Decide first, then call: a grant may
    // release synchronously and change the list.
    const granted: RangeLock[] = [];
    for (let i = 0; i < this.locks.length; i++) {
      const candidate = this.locks[i] as RangeLock;
      if (candidate.held) continue;
      let blocked = false;
      for (let j = 0; j < i; j++) {
        const earlier = this.locks[j] as RangeLock;
        if (earlier.start < candidate.end && candidate.start < earlier.end) {
          blocked = true;
          break;
        }
      }
      if (!blocked) {
        candidate.held = true;
        granted.push(candidate);
      }
    }
    for (const lock of granted) lock.grant(lock);
  }
}
