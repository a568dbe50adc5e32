/**
 * ReplyWriter: how one connection's transmission-phase replies reach its socket, through the native
 * SocketWriter (src/native/socket_writer.cc) instead of Node's stream writes.
 *
 * Why (docs/nbd-server.md, "Reply writer"): a 64 KiB read served from the page cache costs two copies,
 * pread into the reply buffer and the socket write. On the event loop both run on one core, which then
 * caps the connection while the other core idles. A reply of at least `handoffBytes` is handed to the
 * connection's writer thread at once, so its socket copy overlaps the event loop's next pread; smaller
 * replies are gathered for the rest of the loop turn (as corking did) and written by the event loop in
 * one sendmsg when nothing is queued ahead of them, which costs less than a stream write.
 *
 * Ownership: a buffer given to `push` stays referenced here until the native side counts it written (or
 * has stopped), so neither the garbage collector nor the buffer pool can hand its memory to anyone else
 * while a thread may still read it. `release` buffers go back through `releaseBuffer` only then.
 *
 * Order: replies reach the socket in `push` order, each whole (NBD needs no order between replies, but a
 * reply must not be interleaved with another).
 */
import { assert } from "../../errors";
import type { NativeSocketWriter } from "../../native/native";

export class ReplyWriter {
  /** Submitted to the native writer, not yet reaped; `fifoHead` is the oldest. */
  private fifo: Buffer[] = [];
  private fifoReleases: Array<Buffer | null> = [];
  private fifoHead = 0;
  /** Buffers the native side has counted written when we last looked (they are reaped). */
  private reaped = 0;
  /** Gathered this loop turn, submitted by `flush`. */
  private readonly batch: Buffer[] = [];
  private batchHandoff = false;
  private flushScheduled = false;
  private closed = false;
  /** Bytes pushed and not yet written (what the connection's flow control looks at). */
  queuedBytes = 0;

  private readonly flushNow = (): void => {
    this.flushScheduled = false;
    this.flush();
  };

  constructor(
    private readonly writer: NativeSocketWriter,
    private readonly handoffBytes: number,
    private readonly releaseBuffer: (buffer: Buffer) => void,
  ) {}

  /** True when nothing is gathered or waiting to be written. */
  get idle(): boolean {
    return this.batch.length === 0 && this.fifoHead === this.fifo.length;
  }

  /**
   * Queue `buffer`; `release` (a pooled buffer under it, or null) is handed back once it is written. After
   * `close` the reply is dropped (its connection is gone); `release` comes back with the others once the
   * thread has stopped, since an earlier slice of the same buffer may be in its last write.
   */
  push(buffer: Buffer, release: Buffer | null): void {
    if (this.closed) {
      if (release === null) return;
      this.fifo.push(buffer);
      this.fifoReleases.push(release);
      if (this.writer.stopped()) this.dropAll();
      return;
    }
    this.batch.push(buffer);
    this.fifo.push(buffer);
    this.fifoReleases.push(release);
    this.queuedBytes += buffer.length;
    if (buffer.length >= this.handoffBytes) {
      this.batchHandoff = true;
      this.flush();
    } else if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flushNow);
    }
  }

  /** Submit what was gathered. */
  flush(): void {
    if (this.closed || this.batch.length === 0) return;
    const completed = this.writer.send(this.batch, this.batch.length, this.batchHandoff);
    this.batch.length = 0;
    this.batchHandoff = false;
    this.reap(completed);
  }

  /**
   * The native writer reported progress: reap what it wrote. Returns its error's code ("EPIPE", ...)
   * when writing failed, else null.
   */
  progress(): string | null {
    if (this.closed) {
      if (this.writer.stopped()) this.dropAll();
      return null;
    }
    this.reap(this.writer.completed());
    return this.writer.error();
  }

  /** Stop: nothing more is written; buffers are released once the writer thread can no longer read them. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.batch.length = 0;
    this.writer.close();
    if (this.writer.stopped()) this.dropAll();
    // else: the native side calls back once stopped, and `progress` drops them then.
  }

  private reap(completed: number): void {
    let count = completed - this.reaped;
    assert(count >= 0 && count <= this.fifo.length - this.fifoHead, "native writer completed count");
    this.reaped = completed;
    while (count-- > 0) {
      const index = this.fifoHead++;
      this.queuedBytes -= (this.fifo[index] as Buffer).length;
      const release = this.fifoReleases[index];
      if (release !== null && release !== undefined) this.releaseBuffer(release);
    }
    if (this.fifoHead === this.fifo.length) {
      this.fifo.length = 0;
      this.fifoReleases.length = 0;
      this.fifoHead = 0;
    } else if (this.fifoHead >= 1024) {
      this.fifo = this.fifo.slice(this.fifoHead);
      this.fifoReleases = this.fifoReleases.slice(this.fifoHead);
      this.fifoHead = 0;
    }
  }

  private dropAll(): void {
    for (let i = this.fifoHead; i < this.fifo.length; i++) {
      const release = this.fifoReleases[i];
      if (release !== null && release !== undefined) this.releaseBuffer(release);
    }
    this.fifo.length = 0;
    this.fifoReleases.length = 0;
    this.fifoHead = 0;
    this.queuedBytes = 0;
  }
}
