/**
 * Adaptive polling for the event loop — QEMU's `poll-max-ns` (iothread polling) in Node.js terms.
 *
 * Why: at queue depth 1 a request/reply round trip is mostly two wake-ups. When the loop has nothing to do
 * it sleeps in epoll_wait, and on this kind of virtual machine a wake-up from an idle CPU costs tens of
 * microseconds (perf shows half the daemon's CPU in finish_task_switch at QD1). After input arrives, the
 * next request of a synchronous client usually follows within a few tens of microseconds. So for a short
 * window after each input the loop is kept busy with a chain of `setImmediate` callbacks: libuv then polls
 * with a zero timeout and picks the next request up without sleeping. Measured in docs/nbd-server.md
 * ("Hot path"): 4 KiB random reads at QD1 go from ≈ 11.5k to ≈ 18–26k IOPS on a quiet machine.
 *
 * Cost: at most one core spinning for `windowUs` after the last input, then the loop sleeps as before. An
 * idle daemon never spins. `--poll-us 0` turns it off. Under load the loop is never idle anyway, so the
 * chain costs one cheap callback per loop turn.
 */
import { performance } from "node:perf_hooks";
import { assert } from "../../errors";

/** Upper bound for the window: polling longer than this is a busy loop, not a latency trick. */
export const pollWindowUsMax = 1000;
export const pollWindowUsDefault = 50;

export class Poller {
  private untilMs = 0;
  private running = false;
  private readonly windowMs: number;

  constructor(readonly windowUs: number) {
    assert(
      Number.isInteger(windowUs) && windowUs >= 0 && windowUs <= pollWindowUsMax,
      `poll window ${windowUs} µs outside 0..${pollWindowUsMax}`,
    );
    this.windowMs = windowUs / 1000;
  }

  /** Input arrived: keep the loop polling for the window from now. */
  kick(): void {
    if (this.windowMs === 0) return;
    this.untilMs = performance.now() + this.windowMs;
    if (!this.running) {
      this.running = true;
      setImmediate(this.spin);
    }
  }

  private readonly spin = (): void => {
    if (performance.now() < this.untilMs) setImmediate(this.spin);
    else this.running = false;
  };
}
