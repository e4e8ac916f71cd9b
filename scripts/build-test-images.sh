#!/bin/sh
# Builds the test images offline from Debian's busybox-static, as OCI archives:
#   <outdir>/busybox.tar   docker.io/library/busybox:latest (default command: sh)
# Deterministic: sorted names, mtime 0, uid/gid 0. Usage: build-test-images.sh <outdir>
set -eu
out="${1:?usage: build-test-images.sh <outdir>}"
bb=/bin/busybox
[ -x "$bb" ] || { echo "build-test-images: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/var/www" "$root/proc" "$root/sys" "$root/dev" "$root/usr/bin" "$root/sbin" "$root/usr/sbin"
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
    [ "$applet" = busybox ] && continue
    ln -sf busybox "$root/bin/$applet"
done
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
exec python3 - "$work" "$out" <<'PY'
import hashlib, io, json, os, sys, tarfile
work, out = sys.argv[1], sys.argv[2]
root = os.path.join(work, "rootfs")

def layer_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        paths = []
        for d, dirs, files in os.walk(root):
            for n in dirs + files:
                paths.append(os.path.join(d, n))
        for p in sorted(paths):
            rel = os.path.relpath(p, root)
            ti = t.gettarinfo(p, arcname=rel)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            ti.mtime = 0
            if ti.isreg():
                with open(p, "rb") as f:
                    t.addfile(ti, f)
            else:
                t.addfile(ti)
    return buf.getvalue()

layer = layer_tar()
diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({
    "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
    "os": "linux",
    "config": {"Cmd": ["sh"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created_by": "k3rs scripts/build-test-images.sh"}],
}, sort_keys=True).encode()
blobs = {}
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    blobs[d] = data
    return "sha256:" + d
cfg_d = blob(config)
layer_d = blob(layer)
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d, "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_d, "size": len(layer)}],
}, sort_keys=True).encode()
man_d = blob(manifest)
name = "docker.io/library/busybox:latest"
index = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d, "size": len(manifest),
                   "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"}}],
}, sort_keys=True).encode()
def add(t, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o644
    t.addfile(ti, io.BytesIO(data))
tmp = os.path.join(out, "busybox.tar.tmp")
with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
    add(t, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    add(t, "index.json", index)
    for d in sorted(blobs):
        add(t, "blobs/sha256/" + d, blobs[d])
os.replace(tmp, os.path.join(out, "busybox.tar"))
PY
