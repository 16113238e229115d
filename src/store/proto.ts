/** The loaded exa_store.proto package (typed by the generated ProtoGrpcType). */
import * as grpc from '@grpc/grpc-js';
import { loadProto } from '../grpc.js';
import type { ProtoGrpcType as StoreProto } from '../gen/exa_store.js';
import { installImageCodec, installServerFramePatch } from './codec-image.js';
import { installRecvPool } from '../grpc-recv-pool.js';

let patched = false;

/**
 * The package, with GetImage's response codec replaced by the copy-free one
 * of src/store/codec-image.ts (same wire format). The client constructor is
 * rebuilt from the patched definition: grpc-js binds codecs when it makes it.
 */
export function storeProto(): StoreProto {
  const pkg = loadProto<StoreProto>('exa_store.proto');
  if (!patched) {
    patched = true;
    const v1 = pkg.exa.v1 as unknown as { Store: grpc.ServiceClientConstructor };
    const service = v1.Store.service;
    installImageCodec(service as unknown as Record<string, unknown>);
    v1.Store = grpc.makeClientConstructor(service, 'Store');
    installServerFramePatch();
    // Large received messages (PutCheckpoint data, GetImage pieces) land in recycled buffers.
    installRecvPool();
  }
  return pkg;
}
