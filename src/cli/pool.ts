/**
 * `vdisk pool ...` and `vdisk tier ...`: pools of devices with classes, and where each disk's data is.
 *
 *   vdisk pool create NAME [--class CLASS] [--emulate MODEL]
 *   vdisk pool add-device POOL PATH --class CLASS [--capacity SIZE] [--emulate MODEL]
 *   vdisk pool set-device POOL DEVICE [--class CLASS] [--capacity SIZE|none]
 *   vdisk pool remove-device POOL DEVICE   moves the device's data to the others, then removes it
 *   vdisk pool set POOL [--policy static|heat|profile] [--fast-class CLASS] [--migrate-rate SIZE]
 *   vdisk pool list
 *   vdisk tier status [DISK]
 *   vdisk tier run POOL          one placement pass now, printed once its moves are done
 *
 * All take --home and --json (the API's body). Registered by main.ts through `registerPools`; the daemon
 * side is src/daemon/registry.ts (pools) and src/tier/tier-manager.ts (placement, migration, status).
 */
import * as path from "node:path";
import type { Command } from "commander";
import type { PoolInfo } from "../daemon/registry";
import type { PassResult, TierStatus } from "../tier/tier-manager";
import { poolPolicies } from "../tier/pools";
import { formatSize, parseSize } from "../util/size";
import { type CommonOptions, clientFor } from "./client";
import type { CommandFactory, Handled } from "./main";
import { keyValues, output, pinsText, table } from "./output";

function poolPath(name: string): string {
  return `/v1/pools/${encodeURIComponent(name)}`;
}

/** One pool: its settings, then a table of its devices. */
export function poolText(pool: PoolInfo): string {
  const head = keyValues([
    ["pool", pool.name],
    ["policy", pool.policy],
    ["fast class", pool.fastClass],
    ["migration", `${formatSize(pool.migrateBytesPerSecond)}/s, ${formatSize(pool.migratedBytes)} moved`],
    ["disks", pool.disks.length > 0 ? pool.disks.join(", ") : "-"],
  ]);
  const rows = pool.devices.map((device) => [
    String(device.id),
    device.class,
    formatSize(device.usedBytes),
    device.capacity === null ? "-" : formatSize(device.capacity),
    device.emulate ?? "-",
    device.path,
  ]);
  return `${head}\n${table(["DEV", "CLASS", "USED", "CAPACITY", "EMULATE", "PATH"], rows)}`;
}

export function tierText(status: TierStatus): string {
  const parts: string[] = [];
  for (const pool of status.pools) {
    if (pool.devices.length === 1 && pool.lastPass === null && pool.name === "default") continue;
    const moving = pool.moving.running
      ? `running, ${pool.moving.queued} queued${pool.moving.current ? `, now ${pool.moving.current}` : ""}`
      : "idle";
    const last = pool.lastPass
      ? `${pool.lastPass.at}: ${pool.lastPass.promotions} up, ${pool.lastPass.demotions} down, ${pool.lastPass.pinMoves} pinned, ${formatSize(pool.lastPass.bytesMoved)} in ${pool.lastPass.ms} ms`
      : "none yet";
    parts.push(
      keyValues([
        ["pool", `${pool.name} (${pool.policy}, fast class ${pool.fastClass})`],
        ["moving", moving],
        ["last pass", last],
        ["passes", `${pool.passes} run, ${pool.idleSkips} skipped (nothing had changed)`],
        ["moved", formatSize(pool.migratedBytes)],
      ]),
    );
  }
  const classes = [...new Set(status.disks.flatMap((disk) => Object.keys(disk.classes)))].sort();
  const rows = status.disks.map((disk) => [
    disk.name,
    disk.pool,
    disk.priority,
    disk.pins.length === 0 ? "-" : pinsText(disk.pins),
    ...classes.map((cls) => formatSize(disk.classes[cls] ?? 0)),
  ]);
  parts.push(table(["DISK", "POOL", "PRIORITY", "PINS", ...classes.map((cls) => cls.toUpperCase())], rows));
  return parts.join("\n\n");
}

export function registerPools(program: Command, command: CommandFactory, handled: Handled): void {
  const pool = program.command("pool").description("pools of devices (ssd, hdd, ...) that disks live on");
  command(pool, "create <name>", "create a pool; its first device is a directory in the home")
    .option("--class <class>", "class of the pool's own directory: ssd, hdd or a name", "default")
    .option("--emulate <model>", "emulate the device: hdd, ssd, or e.g. hdd:rpm=5400 (tests, benchmarks)")
    .action(
      handled(async (name: string, options: CommonOptions & { class: string; emulate?: string }) => {
        const body: Record<string, unknown> = { name, class: options.class };
        if (options.emulate !== undefined) body.emulate = options.emulate;
        output(options, await clientFor(options).post<PoolInfo>("/v1/pools", body), poolText);
      }),
    );
  command(pool, "add-device <pool> <path>", "add a directory on another device to a pool, live")
    .requiredOption("--class <class>", "the device's class: ssd, hdd or a name")
    .option("--capacity <size>", "bytes the pool may place on it, e.g. 200G (default: no limit)")
    .option("--emulate <model>", "emulate the device: hdd, ssd, or e.g. ssd:channels=4 (tests, benchmarks)")
    .action(
      handled(
        async (
          name: string,
          dir: string,
          options: CommonOptions & { class: string; capacity?: string; emulate?: string },
        ) => {
          const body: Record<string, unknown> = { path: path.resolve(dir), class: options.class };
          if (options.capacity !== undefined) body.capacity = parseSize(options.capacity);
          if (options.emulate !== undefined) body.emulate = options.emulate;
          const result = await clientFor(options).post<PoolInfo>(`${poolPath(name)}/devices`, body);
          output(options, result, poolText);
        },
      ),
    );
  command(pool, "set-device <pool> <device>", "change a pool device's class or capacity, live")
    .option("--class <class>", "the device's new class")
    .option("--capacity <size>", "bytes the pool may place on it, e.g. 200G, or none for no limit")
    .action(
      handled(
        async (
          name: string,
          device: string,
          options: CommonOptions & { class?: string; capacity?: string },
        ) => {
          const body: Record<string, unknown> = {};
          if (options.class !== undefined) body.class = options.class;
          if (options.capacity !== undefined) {
            body.capacity = options.capacity === "none" ? null : parseSize(options.capacity);
          }
          const result = await clientFor(options).post<PoolInfo>(
            `${poolPath(name)}/devices/${encodeURIComponent(device)}`,
            body,
          );
          output(options, result, poolText);
        },
      ),
    );
  command(
    pool,
    "remove-device <pool> <device>",
    "move a device's data to the pool's others, then remove it, live",
  ).action(
    handled(async (name: string, device: string, options: CommonOptions) => {
      const result = await clientFor(options).delete<PoolInfo & { movedBytes: number }>(
        `${poolPath(name)}/devices/${encodeURIComponent(device)}`,
      );
      output(
        options,
        result,
        (pool) => `moved ${formatSize(pool.movedBytes)}; device ${device} removed\n${poolText(pool)}`,
      );
    }),
  );
  command(pool, "set <pool>", "change a pool's placement policy, fast class or migration rate, live")
    .option("--policy <policy>", `placement policy: ${poolPolicies.join(", ")}`)
    .option("--fast-class <class>", "the class the heat and profile policies fill first (default ssd)")
    .option("--migrate-rate <size>", "bytes per second background migration may copy, e.g. 64M")
    .action(
      handled(
        async (
          name: string,
          options: CommonOptions & { policy?: string; fastClass?: string; migrateRate?: string },
        ) => {
          const body: Record<string, unknown> = {};
          if (options.policy !== undefined) body.policy = options.policy;
          if (options.fastClass !== undefined) body.fastClass = options.fastClass;
          if (options.migrateRate !== undefined) body.migrateBytesPerSecond = parseSize(options.migrateRate);
          const result = await clientFor(options).post<PoolInfo>(`${poolPath(name)}/settings`, body);
          output(options, result, poolText);
        },
      ),
    );
  command(pool, "list", "list the pools, their devices and what they hold").action(
    handled(async (options: CommonOptions) => {
      const result = await clientFor(options).get<{ pools: PoolInfo[] }>("/v1/pools");
      output(options, result, (data) => data.pools.map(poolText).join("\n\n"));
    }),
  );

  const tier = program.command("tier").description("where disks' data is, and what is moving");
  command(tier, "status [disk]", "bytes of each disk per device class, and the pools' migrations").action(
    handled(async (disk: string | undefined, options: CommonOptions) => {
      const query = disk === undefined ? "" : `?disk=${encodeURIComponent(disk)}`;
      output(options, await clientFor(options).get<TierStatus>(`/v1/tier${query}`), tierText);
    }),
  );
  command(tier, "run <pool>", "run one placement pass of a pool now and wait for its moves").action(
    handled(async (name: string, options: CommonOptions) => {
      const result = await clientFor(options).post<PassResult>(`${poolPath(name)}/tier/run`, {});
      output(
        options,
        result,
        (pass) =>
          `pool ${pass.pool} (${pass.policy}): ${pass.promotions} extents up, ${pass.demotions} down, ${pass.pinMoves} to their pins; ${formatSize(pass.bytesMoved)} moved in ${pass.ms} ms`,
      );
    }),
  );
}
