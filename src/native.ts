/**
 * The only module that loads the native addon. Everything else imports the
 * typed wrappers declared here.
 */
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Repository root (this file lives in src/ or dist/src/). */
export const repoRoot: string = (() => {
  const here = dirname(fileURLToPath(import.meta.url));
  return here.includes(`${join('dist', 'src')}`) ? join(here, '..', '..') : join(here, '..');
})();

interface NativeAddon {
  version(): number;
}

const require = createRequire(import.meta.url);
export const addon: NativeAddon = require(join(repoRoot, 'build', 'Release', 'exa_native.node')) as NativeAddon;
