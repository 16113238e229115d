// SHA-256 of many pages at once, for native code outside hash.cc (the pack
// reader's checks, the checkpointer's saver): the same engine as the
// sha256Pages binding (libipsec-mb lanes, SHA-NI where the CPU has it, or
// OpenSSL; see hash.cc). Safe on any thread: each thread has its own manager.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace exa {

// out[32i..32i+32) = SHA-256 of msgs[i] (len bytes each); a null msgs[i] gives 32 zero bytes.
void sha256_each(const uint8_t *const *msgs, size_t count, size_t len, uint8_t *out);

// out[32i..32i+32) = SHA-256 of base[i*len .. (i+1)*len), for i < count.
void sha256_pages(const uint8_t *base, size_t count, size_t len, uint8_t *out);

}  // namespace exa
