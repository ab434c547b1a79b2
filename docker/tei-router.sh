#!/bin/sh
# TEI_BINARY_PATH in teisup's image: starts text-embeddings-router as TEI's own
# image starts it. TEI's CUDA images go through /entrypoint.sh, which puts the
# CUDA forward-compatibility libraries on LD_LIBRARY_PATH when the host's
# driver is older than the image's CUDA (12.9 in TEI 1.9), and says so plainly
# when no GPU was given to the container (no nvidia-smi). The CPU image has no
# such script. exec keeps one process: teisup's signals reach the router.
entrypoint=${TEI_IMAGE_ENTRYPOINT:-/entrypoint.sh}
if [ -x "$entrypoint" ]; then
    exec "$entrypoint" "$@"
fi
exec text-embeddings-router "$@"
