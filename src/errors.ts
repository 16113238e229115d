/**
 * The project's closed set of error codes, and the one place where failures
 * from everywhere (errno from native code, LevelDB, S3, gRPC) are folded onto
 * them and mapped to gRPC statuses and process exit codes.
 *
 * This module imports nothing: storage/ and native wrappers may throw
 * ExaError without knowing about gRPC; src/ transports map it with
 * toGrpcStatus()/fromGrpcError().
 */

export type ExaCode =
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'INVALID_ARGUMENT'
  | 'FAILED_PRECONDITION'
  | 'CORRUPT'
  | 'CONFLICT'
  | 'UNAVAILABLE'
  | 'PERMISSION_DENIED'
  | 'RESOURCE_EXHAUSTED'
  | 'CANCELLED'
  | 'DEADLINE_EXCEEDED'
  | 'UNIMPLEMENTED'
  | 'INTERNAL';

export const EXA_CODES: readonly ExaCode[] = [
  'NOT_FOUND', 'ALREADY_EXISTS', 'INVALID_ARGUMENT', 'FAILED_PRECONDITION', 'CORRUPT', 'CONFLICT',
  'UNAVAILABLE', 'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'CANCELLED', 'DEADLINE_EXCEEDED',
  'UNIMPLEMENTED', 'INTERNAL',
];

/** An error that carries one of the project's codes and a message naming the thing concerned. */
export class ExaError extends Error {
  override readonly name = 'ExaError';
  constructor(
    readonly code: ExaCode,
    message: string,
    readonly detail: Record<string, unknown> = {},
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export function isExaError(e: unknown, code?: ExaCode): e is ExaError {
  return e instanceof ExaError && (code === undefined || e.code === code);
}

/** gRPC status codes (grpc/status.h); numeric so this module needs no gRPC import. */
export const GrpcStatus = {
  OK: 0, CANCELLED: 1, UNKNOWN: 2, INVALID_ARGUMENT: 3, DEADLINE_EXCEEDED: 4, NOT_FOUND: 5,
  ALREADY_EXISTS: 6, PERMISSION_DENIED: 7, RESOURCE_EXHAUSTED: 8, FAILED_PRECONDITION: 9, ABORTED: 10,
  OUT_OF_RANGE: 11, UNIMPLEMENTED: 12, INTERNAL: 13, UNAVAILABLE: 14, DATA_LOSS: 15, UNAUTHENTICATED: 16,
} as const;

const toGrpc: Record<ExaCode, number> = {
  NOT_FOUND: GrpcStatus.NOT_FOUND,
  ALREADY_EXISTS: GrpcStatus.ALREADY_EXISTS,
  INVALID_ARGUMENT: GrpcStatus.INVALID_ARGUMENT,
  FAILED_PRECONDITION: GrpcStatus.FAILED_PRECONDITION,
  CORRUPT: GrpcStatus.DATA_LOSS,
  CONFLICT: GrpcStatus.ABORTED,
  UNAVAILABLE: GrpcStatus.UNAVAILABLE,
  PERMISSION_DENIED: GrpcStatus.PERMISSION_DENIED,
  RESOURCE_EXHAUSTED: GrpcStatus.RESOURCE_EXHAUSTED,
  CANCELLED: GrpcStatus.CANCELLED,
  DEADLINE_EXCEEDED: GrpcStatus.DEADLINE_EXCEEDED,
  UNIMPLEMENTED: GrpcStatus.UNIMPLEMENTED,
  INTERNAL: GrpcStatus.INTERNAL,
};

const fromGrpc = new Map<number, ExaCode>([
  [GrpcStatus.CANCELLED, 'CANCELLED'],
  [GrpcStatus.INVALID_ARGUMENT, 'INVALID_ARGUMENT'],
  [GrpcStatus.OUT_OF_RANGE, 'INVALID_ARGUMENT'],
  [GrpcStatus.DEADLINE_EXCEEDED, 'DEADLINE_EXCEEDED'],
  [GrpcStatus.NOT_FOUND, 'NOT_FOUND'],
  [GrpcStatus.ALREADY_EXISTS, 'ALREADY_EXISTS'],
  [GrpcStatus.PERMISSION_DENIED, 'PERMISSION_DENIED'],
  [GrpcStatus.UNAUTHENTICATED, 'PERMISSION_DENIED'],
  [GrpcStatus.RESOURCE_EXHAUSTED, 'RESOURCE_EXHAUSTED'],
  [GrpcStatus.FAILED_PRECONDITION, 'FAILED_PRECONDITION'],
  [GrpcStatus.ABORTED, 'CONFLICT'],
  [GrpcStatus.UNIMPLEMENTED, 'UNIMPLEMENTED'],
  [GrpcStatus.UNAVAILABLE, 'UNAVAILABLE'],
  [GrpcStatus.DATA_LOSS, 'CORRUPT'],
]);

/** Metadata key carrying the ExaCode across gRPC, so CORRUPT and CONFLICT survive the round trip exactly. */
export const EXA_CODE_METADATA_KEY = 'exa-code';

/** Fold any thrown value onto an ExaError (errno, LevelDB, S3 and plain errors included). */
export function toExaError(e: unknown, context?: string): ExaError {
  if (e instanceof ExaError) return context ? new ExaError(e.code, `${context}: ${e.message}`, e.detail, { cause: e }) : e;
  const err = e as { code?: unknown; message?: unknown; name?: unknown; $metadata?: { httpStatusCode?: number } };
  const message = typeof err?.message === 'string' ? err.message : String(e);
  const prefix = context ? `${context}: ` : '';
  const code = classify(err);
  return new ExaError(code, prefix + message, {}, { cause: e });
}

function classify(err: { code?: unknown; name?: unknown; $metadata?: { httpStatusCode?: number } }): ExaCode {
  const c = err?.code;
  if (typeof c === 'string') {
    if ((EXA_CODES as readonly string[]).includes(c)) return c as ExaCode;
    switch (c) {
      // errno
      case 'ENOENT': case 'ESRCH': return 'NOT_FOUND';
      case 'EEXIST': return 'ALREADY_EXISTS';
      case 'EINVAL': case 'E2BIG': case 'ENAMETOOLONG': return 'INVALID_ARGUMENT';
      case 'EACCES': case 'EPERM': return 'PERMISSION_DENIED';
      case 'ENOMEM': case 'ENOSPC': case 'EMFILE': case 'ENFILE': case 'EDQUOT': return 'RESOURCE_EXHAUSTED';
      case 'ECONNREFUSED': case 'ECONNRESET': case 'EPIPE': case 'ETIMEDOUT': case 'EHOSTUNREACH':
      case 'ENETUNREACH': case 'EAI_AGAIN': case 'ENOTFOUND': return 'UNAVAILABLE';
      case 'EBUSY': return 'CONFLICT';
      case 'ENOSYS': case 'EOPNOTSUPP': return 'UNIMPLEMENTED';
      // abstract-level / classic-level
      case 'LEVEL_NOT_FOUND': return 'NOT_FOUND';
      case 'LEVEL_CORRUPTION': return 'CORRUPT';
      case 'LEVEL_DATABASE_NOT_OPEN': case 'LEVEL_DATABASE_NOT_CLOSED': case 'LEVEL_LOCKED': return 'UNAVAILABLE';
      case 'LEVEL_IO_ERROR': return 'UNAVAILABLE';
      default: break;
    }
  }
  if (typeof c === 'number' && fromGrpc.has(c)) return fromGrpc.get(c)!;
  // AWS SDK v3 errors: a name and an HTTP status
  const name = typeof err?.name === 'string' ? err.name : '';
  const http = err?.$metadata?.httpStatusCode;
  if (name === 'NoSuchKey' || name === 'NoSuchBucket' || name === 'NotFound' || http === 404) return 'NOT_FOUND';
  if (name === 'PreconditionFailed' || http === 412 || http === 409) return 'CONFLICT';
  if (name === 'AccessDenied' || name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch' || http === 403) return 'PERMISSION_DENIED';
  if (name === 'SlowDown' || name === 'TimeoutError' || (http !== undefined && http >= 500)) return 'UNAVAILABLE';
  return 'INTERNAL';
}

/** The gRPC status for an error (ExaError or anything toExaError() understands). */
export function toGrpcStatus(e: unknown): { code: number; details: string; exaCode: ExaCode } {
  const x = toExaError(e);
  return { code: toGrpc[x.code], details: x.message, exaCode: x.code };
}

/**
 * Rebuild an ExaError from a failed gRPC call (a ServiceError: code, details,
 * metadata). The exa-code metadata wins over the status when present.
 */
export function fromGrpcError(e: unknown, context?: string): ExaError {
  const se = e as { code?: number; details?: string; message?: string; metadata?: { get(k: string): unknown[] } };
  const md = se?.metadata?.get?.(EXA_CODE_METADATA_KEY)?.[0];
  const mdCode = typeof md === 'string' && (EXA_CODES as readonly string[]).includes(md) ? (md as ExaCode) : undefined;
  const code: ExaCode = mdCode ?? (typeof se?.code === 'number' ? fromGrpc.get(se.code) ?? 'INTERNAL' : 'INTERNAL');
  const text = se?.details || se?.message || String(e);
  return new ExaError(code, context ? `${context}: ${text}` : text, {}, { cause: e });
}

/** Exit code for CLIs: 0 ok, 1 internal, 2 usage/invalid, 3 not found, 4 unavailable, 5 corrupt, 6 conflict/exists, 7 denied. */
export function exitCodeFor(e: unknown): number {
  switch (toExaError(e).code) {
    case 'INVALID_ARGUMENT': case 'FAILED_PRECONDITION': return 2;
    case 'NOT_FOUND': return 3;
    case 'UNAVAILABLE': case 'DEADLINE_EXCEEDED': return 4;
    case 'CORRUPT': return 5;
    case 'CONFLICT': case 'ALREADY_EXISTS': return 6;
    case 'PERMISSION_DENIED': return 7;
    default: return 1;
  }
}
