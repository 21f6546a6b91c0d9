# Bakes one export into a serving image. The build context is a staging copy of the export folder holding only what
# the server reads (scripts/bake-serve-image: one variant's graphs, no torch weights), so neither the repo nor other
# exports reach the daemon. `just export` runs it; by hand:
#   bash scripts/bake-serve-image exports/<name> smolbox-serve:<name> q4
# The files stay root-owned and read-only for the non-root server.
ARG SERVE_IMAGE
FROM ${SERVE_IMAGE}
ARG EXPORT_NAME=unknown
ARG VARIANT=""
LABEL io.smolbox.export="${EXPORT_NAME}" \
      io.smolbox.variant="${VARIANT:-auto}"
COPY . /models/export/
# The baked variant is what the server loads unless SMOLBOX_SERVE__VARIANT says otherwise at run time.
ENV SMOLBOX_EXPORT_NAME=${EXPORT_NAME} \
    SMOLBOX_SERVE__VARIANT=${VARIANT:-auto}
