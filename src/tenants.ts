/**
 * Tenants: who may touch which jobs (DESIGN §7: "one job cannot read another
 * tenant's images").
 *
 * A tenants file (YAML) names each tenant, the bearer token its people and
 * tools present (by SHA-256, or in clear), the jobs it owns (exact ids, or
 * prefixes written `PREFIX*`) and, for agents, the local uids whose
 * processes act for it:
 *
 *     tenants:
 *       - name: alice
 *         token_sha256: 2bd806c9...   # sha256sum of the token (or `token: ...` in clear)
 *         jobs: [alice-*, heat42]
 *         uids: [1001]
 *
 * `exastore serve --token T --tenants FILE`: T, the cluster token, stays the
 * operator's and the agents' credential and may do everything; a tenant's
 * token reaches only that tenant's jobs: job-scoped calls on other jobs are
 * refused with PERMISSION_DENIED naming the tenant and the job, listings show
 * only its jobs, and whole-store work (GC, verify or stat of everything, and
 * every call not listed in RULES) is the operator's. Anything not listed is
 * refused: a new RPC is closed to tenants until someone decides otherwise.
 *
 * `exaagent --tenants FILE`: a process of one of a tenant's uids may attach
 * (and so checkpoint, restore and DMA) only as one of that tenant's jobs.
 *
 * Known limit: pages are deduplicated across the whole store, so a tenant
 * uploading a page learns whether the store already held it (as with any
 * cross-user dedup). Tenants that must not learn even that need stores of
 * their own.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Metadata, ServerInterceptingCall, type Responder, type ServerInterceptor, type ServerListener } from '@grpc/grpc-js';
import { parseDocument } from 'yaml';
import { ExaError } from './errors.js';
import type { NativeTenantUids } from './native.js';
import { grpcStatusFor, TENANT_SCOPED } from './grpc.js';

export interface Tenant {
  readonly name: string;
  /** Exact job ids. */
  readonly jobs: ReadonlySet<string>;
  /** Job id prefixes (from `PREFIX*`). */
  readonly prefixes: readonly string[];
  readonly uids: readonly number[];
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** A job pattern: a job id (storage/engine.ts JOB_RE), optionally ending in `*`; a lone `*` is refused. */
const PATTERN_RE = /^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}\*?$/;
const HEX64_RE = /^[0-9a-f]{64}$/;

function sha256Hex(s: string): string {
  return createHash('sha256').update(s).digest('hex');
}

export class TenantTable {
  private constructor(
    readonly tenants: readonly Tenant[],
    private readonly byDigest: ReadonlyMap<string, Tenant>,
    private readonly byUidMap: ReadonlyMap<number, Tenant>,
    readonly source: string,
  ) {}

  /** Read and check a tenants file; every mistake is an INVALID_ARGUMENT naming the file and the entry. */
  static load(file: string): TenantTable {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (e) {
      throw new ExaError('INVALID_ARGUMENT', `tenants file ${file}: cannot read it: ${(e as Error).message}`);
    }
    return TenantTable.parse(text, file);
  }

  static parse(text: string, source = 'tenants file'): TenantTable {
    const bad = (what: string): never => { throw new ExaError('INVALID_ARGUMENT', `${source}: ${what}`); };
    const doc = parseDocument(text, { uniqueKeys: true });
    if (doc.errors.length) bad(`not valid YAML: ${doc.errors[0]!.message}`);
    const root = doc.toJS() as unknown;
    if (!root || typeof root !== 'object' || Array.isArray(root)) bad('expected a mapping with a "tenants" list');
    for (const k of Object.keys(root as object)) if (k !== 'tenants') bad(`unknown key "${k}" (only "tenants")`);
    const list = (root as { tenants?: unknown }).tenants;
    if (!Array.isArray(list) || list.length === 0) bad('"tenants" must be a non-empty list');
    const tenants: Tenant[] = [];
    const byDigest = new Map<string, Tenant>();
    const byUid = new Map<number, Tenant>();
    const names = new Set<string>();
    (list as unknown[]).forEach((raw, i) => {
      const where = `tenant #${i + 1}`;
      if (!raw || typeof raw !== 'object' || Array.isArray(raw)) bad(`${where}: expected a mapping (name, token_sha256 or token, jobs, uids)`);
      const t = raw as Record<string, unknown>;
      for (const k of Object.keys(t)) if (!['name', 'token', 'token_sha256', 'jobs', 'uids'].includes(k)) bad(`${where}: unknown key "${k}"`);
      const name = t.name;
      if (typeof name !== 'string' || !NAME_RE.test(name)) bad(`${where}: "name" must be 1-64 characters from A-Z a-z 0-9 . _ -, not ${JSON.stringify(name)}`);
      const who = `tenant ${name as string}`;
      if (names.has(name as string)) bad(`${who} is named twice`);
      names.add(name as string);
      if (t.token !== undefined && t.token_sha256 !== undefined) bad(`${who}: give token or token_sha256, not both`);
      let digest: string | null = null;
      if (t.token !== undefined) {
        if (typeof t.token !== 'string' || t.token.length < 16) bad(`${who}: "token" must be a string of at least 16 characters`);
        digest = sha256Hex(t.token as string);
      } else if (t.token_sha256 !== undefined) {
        if (typeof t.token_sha256 !== 'string' || !HEX64_RE.test(t.token_sha256)) bad(`${who}: "token_sha256" must be 64 lowercase hex digits (sha256sum of the token)`);
        digest = t.token_sha256 as string;
      }
      const jobsRaw = t.jobs;
      if (!Array.isArray(jobsRaw) || jobsRaw.length === 0) bad(`${who}: "jobs" must be a non-empty list of job ids or PREFIX* patterns`);
      const jobs = new Set<string>();
      const prefixes: string[] = [];
      for (const p of jobsRaw as unknown[]) {
        if (typeof p !== 'string' || !PATTERN_RE.test(p)) bad(`${who}: job pattern ${JSON.stringify(p)} is not a job id or PREFIX* (a lone "*" is not allowed)`);
        if ((p as string).endsWith('*')) prefixes.push((p as string).slice(0, -1));
        else jobs.add(p as string);
      }
      const uidsRaw = t.uids ?? [];
      if (!Array.isArray(uidsRaw)) bad(`${who}: "uids" must be a list of user ids`);
      const uids: number[] = [];
      for (const u of uidsRaw as unknown[]) {
        if (typeof u !== 'number' || !Number.isInteger(u) || u < 1 || u > 0xfffffffe) bad(`${who}: uid ${JSON.stringify(u)} is not a user id (1-4294967294; root acts for nobody)`);
        uids.push(u as number);
      }
      if (digest === null && uids.length === 0) bad(`${who}: give a token (store, coordinator) or uids (agents), or both`);
      const tenant: Tenant = { name: name as string, jobs, prefixes, uids };
      if (digest !== null) {
        const other = byDigest.get(digest);
        if (other) bad(`${who} has the same token as tenant ${other.name}`);
        byDigest.set(digest, tenant);
      }
      for (const u of uids) {
        const other = byUid.get(u);
        if (other) bad(`${who}: uid ${u} already belongs to tenant ${other.name}`);
        byUid.set(u, tenant);
      }
      tenants.push(tenant);
    });
    return new TenantTable(tenants, byDigest, byUid, source);
  }

  /** The tenant whose token this is, or null. */
  byToken(token: string): Tenant | null {
    return this.byDigest.get(sha256Hex(token)) ?? null;
  }

  byUid(uid: number): Tenant | null {
    return this.byUidMap.get(uid) ?? null;
  }

  /** The cluster token must not double as a tenant's. */
  checkClusterToken(token: string | undefined): void {
    if (!token) throw new ExaError('INVALID_ARGUMENT', `--tenants needs --token (the operator's and agents' cluster token): without it, callers with no token would reach every job`);
    const t = this.byToken(token);
    if (t) throw new ExaError('INVALID_ARGUMENT', `${this.source}: tenant ${t.name} has the cluster token (--token) as its token`);
  }
}

/** The tenants with uids, as the native agent takes them (exaagent --tenants). */
export function agentTenants(table: TenantTable): NativeTenantUids[] {
  return table.tenants.filter((t) => t.uids.length > 0).map((t) => ({ tenant: t.name, uids: [...t.uids], jobs: [...t.jobs], prefixes: [...t.prefixes] }));
}

export function owns(t: Tenant, job: string): boolean {
  if (t.jobs.has(job)) return true;
  for (const p of t.prefixes) if (job.startsWith(p)) return true;
  return false;
}

/** What a tenant may do with an RPC: a job-scoped call (the job read from each request), a listing filtered to its jobs. */
type Rule =
  | { kind: 'job'; jobOf: (msg: Record<string, unknown>) => unknown; required: boolean; storeWide?: readonly string[] }
  | { kind: 'list'; field: string };

const job = (required = true): Rule => ({ kind: 'job', jobOf: (m) => m.job, required });
/** Calls open to tenants; everything else is the operator's. */
const RULES: Record<string, Rule> = {
  // PutRequest: only `begin` names the job; the other messages of the stream belong to it.
  '/exa.v1.Store/PutCheckpoint': { kind: 'job', jobOf: (m) => (m.begin as { job?: unknown } | null | undefined)?.job, required: false },
  '/exa.v1.Store/GetImage': job(),
  '/exa.v1.Store/ListJobs': { kind: 'list', field: 'jobs' },
  '/exa.v1.Store/ListCheckpoints': job(),
  '/exa.v1.Store/DeleteCheckpoints': job(),
  '/exa.v1.Store/Compact': job(),
  '/exa.v1.Store/Verify': job(),
  // The whole store's figures in a job's Stat are zeroed for tenants: they tell of other tenants' data.
  '/exa.v1.Store/Stat': { ...job(), storeWide: ['stored_bytes', 'stored_pages', 'metadata_bytes', 'dedup_ratio', 'pending_gc_pages'] } as Rule,
  '/exa.v1.Coordinator/GetPlacement': job(),
  '/exa.v1.Coordinator/ListPlacements': { kind: 'list', field: 'jobs' },
  '/exa.v1.Coordinator/GetJobSpec': job(),
};

function bearer(md: Metadata): string | null {
  const v = md.get('authorization')[0];
  return typeof v === 'string' && v.startsWith('Bearer ') ? v.slice(7) : null;
}

/**
 * A grpc-js server interceptor scoping tenants' calls to their jobs (see the
 * top of this file). Calls with another token (the cluster token, or a wrong
 * one) pass untouched: the handlers' own token check decides about those.
 */
export function tenantScopeInterceptor(table: TenantTable): ServerInterceptor {
  return (method, call) => {
    let tenant: Tenant | null = null;
    let refused = false;
    const rule = RULES[method.path];
    const refuse = (why: string): void => {
      refused = true;
      call.sendStatus(grpcStatusFor(new ExaError('PERMISSION_DENIED', why, { tenant: tenant?.name })));
    };
    return new ServerInterceptingCall(call, {
      start: (next) => {
        const listener: ServerListener = {
          onReceiveMetadata: (md, nextMd) => {
            const tok = bearer(md);
            tenant = tok === null ? null : table.byToken(tok);
            if (tenant && !rule) {
              refuse(`tenant ${tenant.name} may not call ${method.path}: it is for the operator (the cluster token)`);
              return;
            }
            if (tenant) TENANT_SCOPED.add(md);
            nextMd(md);
          },
          onReceiveMessage: (msg, nextMsg) => {
            if (refused) return;
            if (tenant && rule?.kind === 'job') {
              const j = rule.jobOf(msg as Record<string, unknown>);
              if (typeof j === 'string' && j !== '') {
                if (!owns(tenant, j)) return refuse(`tenant ${tenant.name} may not access job ${j}`);
              } else if (rule.required) {
                return refuse(`tenant ${tenant.name}: ${method.path} of the whole store is for the operator; name one of your jobs`);
              }
            }
            nextMsg(msg);
          },
          onReceiveHalfClose: (nextHc) => { if (!refused) nextHc(); },
          // onCancel: left to the default, which passes it on to the handler.
        };
        next(listener);
      },
      sendMessage: ((msg, nextMsg) => {
        if (tenant && rule?.kind === 'job' && rule.storeWide) {
          nextMsg({ ...(msg as Record<string, unknown>), ...Object.fromEntries(rule.storeWide.map((f) => [f, 0])) });
          return;
        }
        if (tenant && rule?.kind === 'list') {
          const m = msg as Record<string, unknown>;
          const items = m[rule.field];
          if (Array.isArray(items)) {
            const t = tenant;
            nextMsg({ ...m, [rule.field]: items.filter((it: { job?: unknown }) => typeof it.job === 'string' && owns(t, it.job)) });
            return;
          }
        }
        nextMsg(msg);
      }) satisfies Responder['sendMessage'],
    });
  };
}
