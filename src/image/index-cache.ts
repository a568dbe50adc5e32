/**
 * IndexCache: the memory budget for the index leaves of open vdisk images, shared by every image that
 * is given the same cache (the daemon has one).
 *
 * What it holds. An image keeps every index node *object* for as long as the node is alive, so parents'
 * child pointers, sharing between layers and reference counts never change when memory is reclaimed.
 * What the cache governs is the *payload* of leaves (level 0): the two arrays of 512 unit types and
 * addresses. A clean leaf that is on disk can drop its payload (eviction) and become a shell of a few
 * fields; the image reads it back (one 4 KiB read, checksum and self address verified) when a request
 * needs it. Upper levels (one node per 512 leaves) are never evicted, so a cold lookup costs one read.
 *
 *   resident leaves: dirty ones (never evictable) + clean ones in the LRU list below
 *
 *   MRU  sentinel ⇄ leaf ⇄ leaf ⇄ ... ⇄ leaf  LRU      (intrusive: the links live in the nodes)
 *        touch = unlink + insert after the sentinel: O(1), no allocation
 *        evict = walk back from the LRU end, skip pinned leaves, drop payloads until under the limit
 *
 * A "byte" of the cache is a byte of the estimated JS memory held by one resident leaf's payload,
 * `leafPayloadBytes` (the 4608 bytes of its arrays, stored in one ArrayBuffer, plus the array objects and
 * allocator overhead). Everything a leaf keeps when evicted, and every upper node, is outside the
 * budget (docs/image-format.md, "Index-node cache", gives the numbers).
 *
 * Invariants: `residentBytes` = `leafPayloadBytes` × resident leaves admitted and not yet discarded or
 * evicted; a leaf is in the LRU list only while it is resident, clean and on disk; eviction runs only
 * when an image calls `evict()` (after loads, after commits, after open) or the limit shrinks, never in
 * the middle of a lookup or an update; a pinned leaf is never evicted.
 */
import { assert } from "../errors";

/** Estimated memory of one resident leaf payload (measured on Node 20, x64: 5.1 KB of RSS each). */
export const leafPayloadBytes = 5120;

export interface IndexCacheStats {
  /** The budget for resident leaf payloads (Infinity: never evict). */
  limitBytes: number;
  /** Payload bytes of resident leaves: clean, dirty and pinned ones. */
  residentBytes: number;
  residentNodes: number;
  /** Resident leaves that are clean and on disk (the LRU list), pinned ones included. */
  evictableNodes: number;
  /** Leaf lookups on request paths that found the leaf resident. */
  hits: number;
  /** Leaf lookups on request paths that needed a load (a load shared by two lookups counts twice). */
  misses: number;
  /** Leaves read back from disk into the cache. */
  loads: number;
  /** Payloads dropped to stay within the limit. */
  evictions: number;
}

/** What the cache needs of an index node: the LRU links, and a way to drop the payload. */
export interface CacheEntry {
  lruPrev: CacheEntry | null;
  lruNext: CacheEntry | null;
  /** Drop the payload (eviction). */
  dropPayload(): void;
}

class Sentinel implements CacheEntry {
  lruPrev: CacheEntry = this;
  lruNext: CacheEntry = this;
  dropPayload(): void {
    assert(false, "the LRU sentinel is never evicted");
  }
}

export class IndexCache {
  private limit: number;
  private residentBytesValue = 0;
  private residentNodesValue = 0;
  private linkedNodes = 0;
  private hitCount = 0;
  private missCount = 0;
  private loadCount = 0;
  private evictionCount = 0;
  private readonly lru = new Sentinel();
  /** Leaves in use by a request or an operation that waited for a load; touched on slow paths only. */
  private readonly pins = new Map<CacheEntry, number>();

  /** `limitBytes`: the budget for resident leaf payloads; Infinity never evicts. */
  constructor(limitBytes: number) {
    this.limit = IndexCache.checkLimit(limitBytes);
  }

  get limitBytes(): number {
    return this.limit;
  }

  /** Change the budget; shrinking evicts down at once, as far as pinned and dirty leaves allow. */
  setLimit(limitBytes: number): void {
    this.limit = IndexCache.checkLimit(limitBytes);
    this.evict();
  }

  stats(): IndexCacheStats {
    return {
      limitBytes: this.limit,
      residentBytes: this.residentBytesValue,
      residentNodes: this.residentNodesValue,
      evictableNodes: this.linkedNodes,
      hits: this.hitCount,
      misses: this.missCount,
      loads: this.loadCount,
      evictions: this.evictionCount,
    };
  }

  private static checkLimit(limitBytes: number): number {
    assert(limitBytes >= 0 && !Number.isNaN(limitBytes), `index cache limit ${limitBytes} is not a size`);
    return limitBytes;
  }

  // ---------------------------------------------------------------------------------------------
  // Used by images

  /** A leaf payload came into memory (a new leaf, or one read back). */
  admit(): void {
    this.residentNodesValue++;
    this.residentBytesValue += leafPayloadBytes;
  }

  /** A resident leaf payload leaves memory without an eviction (the leaf died, or its image closed). */
  discard(entry: CacheEntry): void {
    this.unlink(entry);
    assert(this.residentNodesValue > 0, "discard of a leaf the cache does not count");
    this.residentNodesValue--;
    this.residentBytesValue -= leafPayloadBytes;
  }

  /** The leaf is clean and on disk: it may be evicted (it enters as the most recently used). */
  link(entry: CacheEntry): void {
    assert(entry.lruNext === null, "leaf linked twice");
    const after = this.lru.lruNext;
    entry.lruPrev = this.lru;
    entry.lruNext = after;
    this.lru.lruNext = entry;
    after.lruPrev = entry;
    this.linkedNodes++;
  }

  /** The leaf is about to change (or die): it may no longer be evicted. */
  unlink(entry: CacheEntry): void {
    const prev = entry.lruPrev;
    const next = entry.lruNext;
    if (next === null) return;
    (prev as CacheEntry).lruNext = next;
    next.lruPrev = prev;
    entry.lruPrev = null;
    entry.lruNext = null;
    this.linkedNodes--;
  }

  /** A lookup used the leaf: it becomes the most recently used (O(1), no allocation). */
  touch(entry: CacheEntry): void {
    const next = entry.lruNext;
    if (next === null || entry.lruPrev === this.lru) return;
    const prev = entry.lruPrev as CacheEntry;
    prev.lruNext = next;
    next.lruPrev = prev;
    const first = this.lru.lruNext;
    entry.lruPrev = this.lru;
    entry.lruNext = first;
    first.lruPrev = entry;
    this.lru.lruNext = entry;
  }

  pin(entry: CacheEntry): void {
    this.pins.set(entry, (this.pins.get(entry) ?? 0) + 1);
  }

  unpin(entry: CacheEntry): void {
    const count = this.pins.get(entry);
    assert(count !== undefined, "unpin of a leaf that is not pinned");
    if (count === 1) this.pins.delete(entry);
    else this.pins.set(entry, count - 1);
  }

  recordHits(count: number): void {
    this.hitCount += count;
  }

  recordMisses(count: number): void {
    this.missCount += count;
  }

  recordLoad(): void {
    this.loadCount++;
  }

  /** Drop least recently used clean, unpinned payloads until resident leaves fit the limit. */
  evict(): void {
    let entry = this.lru.lruPrev;
    while (this.residentBytesValue > this.limit && entry !== this.lru) {
      const prev = entry.lruPrev as CacheEntry;
      if (!this.pins.has(entry)) {
        this.unlink(entry);
        entry.dropPayload();
        this.residentNodesValue--;
        this.residentBytesValue -= leafPayloadBytes;
        this.evictionCount++;
      }
      entry = prev;
    }
  }
}
