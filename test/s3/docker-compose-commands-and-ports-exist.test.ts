/**
 * docker-compose.yml parses, and everything it runs exists in this project:
 * each project command is a package.json bin, built, whose CLI declares every
 * option the file passes (read from the CLI's own --help); the store's port is
 * the one the agents dial and the one published; S3 endpoints point at the
 * MinIO service's port; the bucket the store uses is the one the
 * bucket-creating step makes; the Dockerfile installs every bin.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';

const root = join(import.meta.dirname, '..', '..');

interface Service { image?: string; build?: string; command?: string[]; entrypoint?: string[]; ports?: string[]; environment?: Record<string, string>; depends_on?: Record<string, unknown> }

function helpOptions(bin: string, sub: string[]): Set<string> {
  const file = join(root, JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).bin[bin] as string);
  const out = execFileSync(process.execPath, [file, ...sub, '--help'], { encoding: 'utf8', env: { ...process.env, NODE_NO_WARNINGS: '1' } });
  return new Set([...out.matchAll(/(--[a-z0-9][a-z0-9-]*)/g)].map((m) => m[1]!));
}

function flag(cmd: string[], name: string): string | undefined {
  const i = cmd.indexOf(name);
  return i >= 0 ? cmd[i + 1] : undefined;
}

function containerPorts(svc: Service): number[] {
  return (svc.ports ?? []).map((p) => Number(String(p).split(':').pop()));
}

describe('docker-compose.yml', () => {
  // merge: true applies the '<<: *agent' keys as docker compose does.
  const compose = parse(readFileSync(join(root, 'docker-compose.yml'), 'utf8'), { merge: true }) as { services: Record<string, Service> };
  const services = compose.services;
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { bin: Record<string, string> };

  it('has MinIO, a bucket-creating step, the store on S3 and two agents', () => {
    expect(services.minio?.image).toMatch(/^minio\/minio/);
    expect(services.createbucket?.image).toMatch(/^minio\/mc/);
    expect(services.store?.command?.slice(0, 3)).toEqual(['exastore', 'serve', '--s3']);
    const agents = Object.entries(services).filter(([, s]) => s.command?.[0] === 'exaagent');
    expect(agents).toHaveLength(2);
    expect(new Set(agents.map(([, s]) => flag(s.command!, '--host'))).size).toBe(2);
  });

  it('every project command is a built package.json bin that declares every option used', () => {
    for (const [name, svc] of Object.entries(services)) {
      const cmd = svc.command;
      if (!cmd || !(cmd[0]! in pkg.bin)) continue;
      expect(svc.build, `${name} runs ${cmd[0]} and must be built from this repository`).toBe('.');
      expect(existsSync(join(root, pkg.bin[cmd[0]!]!)), `${pkg.bin[cmd[0]!]} is built`).toBe(true);
      const sub = cmd[0] === 'exastore' ? [cmd[1]!] : [];
      const declared = helpOptions(cmd[0]!, sub);
      for (const tok of cmd.slice(1 + sub.length)) {
        if (tok.startsWith('--')) expect(declared.has(tok), `${name}: ${cmd[0]} ${sub.join(' ')} declares ${tok}`).toBe(true);
      }
    }
  });

  it('ports: agents dial the store port it listens on and publishes; S3 endpoints point at MinIO', () => {
    const store = services.store!;
    const storePort = Number(flag(store.command!, '--port'));
    expect(storePort).toBeGreaterThan(0);
    expect(flag(store.command!, '--host')).toBe('0.0.0.0');
    expect(containerPorts(store)).toContain(storePort);
    for (const [name, svc] of Object.entries(services)) {
      if (svc.command?.[0] !== 'exaagent') continue;
      expect(flag(svc.command, '--store'), name).toBe(`store:${storePort}`);
      const listen = Number(flag(svc.command, '--listen')!.split(':').pop());
      const adv = flag(svc.command, '--advertise')!;
      expect(adv, name).toBe(`${name}:${listen}`);
    }
    // MinIO listens where the store and the bucket step reach it.
    const minioCmd = services.minio!.command!;
    const minioPort = Number(flag(minioCmd, '--address')!.split(':').pop());
    expect(containerPorts(services.minio!)).toContain(minioPort);
    expect(flag(store.command!, '--s3-endpoint')).toBe(`http://minio:${minioPort}`);
    const mc = services.createbucket!.entrypoint!.join(' ');
    expect(mc).toContain(`http://minio:${minioPort}`);
    // The store's bucket is the one the step creates, with the MinIO root credentials.
    const bucket = /^s3:\/\/([^/]+)/.exec(flag(store.command!, '--s3')!)![1]!;
    expect(mc).toMatch(new RegExp(`mc mb --ignore-existing local/${bucket}\\b`));
    const env = services.minio!.environment!;
    expect(mc).toContain(`${env.MINIO_ROOT_USER} ${env.MINIO_ROOT_PASSWORD}`);
    expect(store.environment).toMatchObject({ AWS_ACCESS_KEY_ID: env.MINIO_ROOT_USER, AWS_SECRET_ACCESS_KEY: env.MINIO_ROOT_PASSWORD });
  });

  it('the Dockerfile installs every bin the file runs and exposes the ports', () => {
    const df = readFileSync(join(root, 'Dockerfile'), 'utf8');
    for (const b of Object.keys(pkg.bin)) expect(df).toContain(b);
    const exposed = /EXPOSE ([\d ]+)/.exec(df)![1]!.trim().split(/\s+/).map(Number);
    expect(exposed).toContain(Number(flag(services.store!.command!, '--port')));
    expect(exposed).toContain(Number(flag(services['agent-a']!.command!, '--listen')!.split(':').pop()));
  });
});
