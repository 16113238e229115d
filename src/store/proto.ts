/** The loaded exa_store.proto package (typed by the generated ProtoGrpcType). */
import { loadProto } from '../grpc.js';
import type { ProtoGrpcType as StoreProto } from '../gen/exa_store.js';

export function storeProto(): StoreProto {
  return loadProto<StoreProto>('exa_store.proto');
}
