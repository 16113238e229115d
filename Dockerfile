# exackpt: store server, agent and CLIs in one image (see docker-compose.yml).
FROM node:20-bookworm

# The native addon (node-gyp) needs a C/C++ toolchain and python3.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3 libipsec-mb-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/exackpt
COPY . .
# npm ci runs the install script (node-gyp rebuild) and prepare (npm run build).
RUN npm ci && npm run build \
 && for b in exastore exaagent exackpt exarestore; do \
      chmod +x dist/src/cli/$b.js && ln -sf /opt/exackpt/dist/src/cli/$b.js /usr/local/bin/$b; \
    done

# store gRPC (Store + Coordinator) and agent gRPC
EXPOSE 7700 7701
CMD ["exastore", "--help"]
