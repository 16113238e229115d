#!/usr/bin/env node
// Generates TypeScript types for every .proto under proto/ into src/gen/
// with @grpc/proto-loader's own generator, so message types are never hand-written.
import { execFileSync } from 'node:child_process';
import { readdirSync, rmSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const protoDir = join(root, 'proto');
const outDir = join(root, 'src', 'gen');
const protos = readdirSync(protoDir).filter((f) => f.endsWith('.proto'));
rmSync(outDir, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });
if (protos.length > 0) {
  const require = createRequire(import.meta.url);
  const gen = join(dirname(require.resolve('@grpc/proto-loader/package.json')), 'build', 'bin', 'proto-loader-gen-types.js');
  execFileSync(process.execPath, [
    gen, '--keepCase', '--longs=String', '--enums=String', '--defaults', '--oneofs', '--grpcLib=@grpc/grpc-js',
    '--includeComments', '--importFileExtension=.js', '--outDir', outDir,
    // -I is an array option: it must come last or it swallows the file names.
    ...protos, '-I', protoDir,
  ], { stdio: 'inherit', cwd: protoDir });
}
