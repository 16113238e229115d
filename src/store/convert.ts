/** Conversions between storage/ records and the generated exa.v1 message types (both directions). */
import type { ManifestHeader, RegionSpec } from '../../storage/backend.js';
import type { CheckpointInfo } from '../gen/exa/v1/CheckpointInfo.js';
import type { CheckpointInfo__Output } from '../gen/exa/v1/CheckpointInfo.js';
import type { Region, Region__Output } from '../gen/exa/v1/Region.js';
import { PAGE_SIZE } from '../../storage/pages.js';

/** A checkpoint as the client library reports it (numbers, not proto strings). */
export interface CheckpointSummary {
  job: string;
  checkpoint: number;
  parent: number;
  createdAt: string;
  regions: RegionSpec[];
  logicalBytes: number;
  changedPages: number;
  newPages: number;
  zeroPages: number;
  labels: Record<string, string>;
}

export function regionToProto(r: RegionSpec): Region {
  return { name: r.name, page_count: r.pageCount, address: r.address, flags: r.flags };
}

export function regionFromProto(r: Region__Output): RegionSpec {
  return { name: r.name, pageCount: r.page_count, address: r.address, flags: r.flags };
}

export function headerToInfo(h: ManifestHeader): CheckpointInfo {
  return {
    job: h.job, checkpoint: h.checkpoint, parent: h.parent, created_at: new Date(h.createdAt).toISOString(),
    regions: h.regions.map(regionToProto),
    logical_bytes: h.regions.reduce((a, r) => a + r.pageCount, 0) * PAGE_SIZE,
    changed_pages: h.changedPages, new_pages: h.newPages, zero_pages: h.zeroPages, labels: h.labels,
  };
}

export function infoFromProto(i: CheckpointInfo__Output): CheckpointSummary {
  return {
    job: i.job, checkpoint: i.checkpoint, parent: i.parent, createdAt: i.created_at,
    regions: i.regions.map(regionFromProto), logicalBytes: Number(i.logical_bytes),
    changedPages: Number(i.changed_pages), newPages: Number(i.new_pages), zeroPages: Number(i.zero_pages),
    labels: { ...i.labels },
  };
}
