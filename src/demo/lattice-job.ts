#!/usr/bin/env node
/**
 * lattice: the Node demo job. A deterministic integer lattice (a ring of
 * 32-bit cells mixed with their neighbours each step) whose whole state lives
 * in exa regions through the Node binding, so it can be checkpointed live,
 * restored and migrated.
 *
 * Crash consistency, as in native/demo/heat.c: step s reads buffer s % 2 and
 * writes buffer (s + 1) % 2; the step counter is advanced with one aligned
 * 32-bit store only when the new buffer is complete, and the magic word is
 * written last at initialization. A restored job resumes from the regions
 * alone. Integer arithmetic makes the checksum exact on every host.
 *
 * usage: lattice [--cells N] [--steps S] [--step-delay-ms D] [--no-agent]
 * prints "lattice: restored at step S" when resumed, then
 *        "checksum=<16 hex> steps=<S> cells=<N>"
 */
import { attach } from '../workload/index.js';

const MAGIC = 0x4c415454; // "LATT"

function arg(name: string, def: number, min: number, max: number): number {
  const i = process.argv.indexOf(name);
  if (i < 0) return def;
  const v = Number(process.argv[i + 1]);
  if (!Number.isInteger(v) || v < min || v > max) {
    process.stderr.write(`lattice: ${name} expects an integer in [${min}, ${max}], got ${JSON.stringify(process.argv[i + 1] ?? '')}\n`);
    process.exit(2);
  }
  return v;
}

function fnv1a(bytes: Uint8Array): string {
  let h = 0xcbf29ce484222325n;
  for (const b of bytes) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return h.toString(16).padStart(16, '0');
}

async function main(): Promise<void> {
  const cells = arg('--cells', 1 << 16, 16, 1 << 26);
  const steps = arg('--steps', 200, 1, 2 ** 31);
  const delayMs = arg('--step-delay-ms', 0, 0, 60_000);
  const noAgent = process.argv.includes('--no-agent');

  const w = noAgent ? null : attach();
  const stateBuf = w ? w.allocRegion('state', 4096) : new ArrayBuffer(4096);
  const gridBuf = w ? w.allocRegion('lattice', cells * 8) : new ArrayBuffer(cells * 8);
  const state = new Uint32Array(stateBuf); // [magic, step, cells, steps]
  const grid = [new Uint32Array(gridBuf, 0, cells), new Uint32Array(gridBuf, cells * 4, cells)];

  if (Atomics.load(state, 0) === MAGIC) {
    if (state[2] !== cells || state[3] !== steps) {
      process.stderr.write(`lattice: restored state has cells=${state[2]} steps=${state[3]}, arguments say cells=${cells} steps=${steps}\n`);
      process.exit(1);
    }
    process.stdout.write(`lattice: restored at step ${Atomics.load(state, 1)}\n`);
  } else {
    const g0 = grid[0]!;
    let x = 0x9e3779b9;
    for (let i = 0; i < cells; i++) {
      x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
      g0[i] = x;
    }
    state[2] = cells;
    state[3] = steps;
    Atomics.store(state, 1, 0);
    Atomics.store(state, 0, MAGIC);
  }

  for (let s = Atomics.load(state, 1); s < steps; s++) {
    const src = grid[s % 2]!;
    const dst = grid[(s + 1) % 2]!;
    for (let i = 0; i < cells; i++) {
      const l = src[(i + cells - 1) % cells]!;
      const c = src[i]!;
      const r = src[(i + 1) % cells]!;
      dst[i] = (Math.imul(l, 3) + Math.imul(c, 5) + Math.imul(r ^ (c >>> 7), 7) + s) >>> 0;
    }
    Atomics.store(state, 1, s + 1);
    if (delayMs) await new Promise((res) => setTimeout(res, delayMs));
  }
  const final = grid[steps % 2]!;
  process.stdout.write(`checksum=${fnv1a(new Uint8Array(final.buffer, final.byteOffset, final.byteLength))} steps=${steps} cells=${cells}\n`);
  w?.detach();
}

main().catch((e: unknown) => {
  process.stderr.write(`lattice: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(1);
});
