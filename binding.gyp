{
  "target_defaults": {
    "include_dirs": ["native/include"],
    "cflags": ["-Wall", "-Wextra", "-O2", "-fPIC"],
  },
  "targets": [
    {
      "target_name": "libexa",
      "type": "static_library",
      "sources": ["native/libexa/exa.c", "native/libexa/restore.c", "native/libexa/dma.c"],
      "cflags_c": ["-std=gnu11"],
    },
    {
      "target_name": "exa_native",
      "sources": ["native/addon/addon.cc", "native/ckpt/ckpt.cc", "native/ckpt/guardian.cc", "native/addon/dma.cc", "native/dma/backend.cc", "native/addon/hash.cc", "native/addon/packio.cc", "native/addon/pageindex.cc"],
      "dependencies": ["libexa"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")", "native/include"],
      "defines": ["NAPI_VERSION=9", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wno-deprecated-declarations", "-Wno-missing-field-initializers"],
      "cflags_cc!": ["-fno-exceptions"],
      "libraries": ["-lpthread"],
      # Multi-buffer SHA-256 (native/addon/hash.cc) when libipsec-mb-dev is installed; OpenSSL otherwise.
      "variables": {"exa_ipsec_mb": "<!(node -p \"require('fs').existsSync('/usr/include/intel-ipsec-mb.h') ? 1 : 0\")"},
      "conditions": [["exa_ipsec_mb==1", {"defines": ["EXA_HAVE_IPSEC_MB"], "libraries": ["-lIPSec_MB"]}]]
    },
    {
      "target_name": "exa_workload",
      "type": "executable",
      "sources": ["native/test/exa_workload.c"],
      "dependencies": ["libexa"],
      "cflags_c": ["-std=gnu11"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "exa_dma_bench",
      "type": "executable",
      "sources": ["native/test/exa_dma_bench.c"],
      "dependencies": ["libexa"],
      "cflags_c": ["-std=gnu11"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "exa_dma_selftest",
      "type": "executable",
      "sources": ["native/test/exa_dma_selftest.c"],
      "dependencies": ["libexa"],
      "cflags_c": ["-std=gnu11"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "exa_halo",
      "type": "executable",
      "sources": ["native/demo/halo.c"],
      "dependencies": ["libexa"],
      "cflags_c": ["-std=gnu11"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "exa_heat",
      "type": "executable",
      "sources": ["native/demo/heat.c"],
      "dependencies": ["libexa"],
      "cflags_c": ["-std=gnu11"],
      "libraries": ["-lpthread"]
    },
    {
      "target_name": "exa_memjob",
      "type": "executable",
      "sources": ["native/demo/memjob.c"],
      "dependencies": ["libexa"],
      "cflags_c": ["-std=gnu11"],
      "libraries": ["-lpthread"]
    }
  ]
}
