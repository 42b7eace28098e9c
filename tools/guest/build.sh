#!/usr/bin/env bash
# Build a small Linux guest for testing the kernel NBD client: Debian's cloud kernel (which
# carries nbd.ko; this host's kernel has no nbd module) and an initramfs with busybox,
# mkfs.ext4, tandem and an /init that runs /test.sh if there is one.
#
#   tools/guest/build.sh OUTDIR TANDEM [OVERLAY_DIR]
#
# Writes OUTDIR/vmlinuz, OUTDIR/initrd (the base archive, plus OVERLAY_DIR's files as a
# second archive, e.g. /config.toml and /test.sh) and OUTDIR/qemu (runs qemu-system-x86_64,
# either the installed one or one unpacked from Debian's packages into OUTDIR). Downloaded
# packages and unpacked trees stay in OUTDIR, so reruns only repack the initramfs.
# Needs root (device nodes in the archive), apt-get, dpkg, cpio and gzip.
set -euo pipefail
die() { echo "guest build: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 OUTDIR TANDEM [OVERLAY_DIR]"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
tandem=$2
overlay=${3:-}
[ -x "$tandem" ] || die "no tandem binary at $tandem"
for c in apt-get apt-cache dpkg cpio gzip ldd; do
    command -v "$c" >/dev/null || die "$c is missing (see .ci/run)"
done
[ "$(id -u)" = 0 ] || die "must run as root (the initramfs needs /dev/console)"

debs=$out/debs
mkdir -p "$debs"
# _apt cannot write here; apt-get then downloads as root and warns, which is fine.
fetch() { (cd "$debs" && apt-get download "$@" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true; }
have_deb() { compgen -G "$debs/${1}_*.deb" >/dev/null; }
updated=
ensure_lists() {
    # A fresh machine may have no package lists yet.
    if [ -z "$updated" ]; then apt-get update -qq >&2 || true; updated=1; fi
}

# --- kernel: the current cloud flavour for this release, found through its metapackage ---
cloud_kernel() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
kpkg=$(cloud_kernel)
[ -n "$kpkg" ] && { have_deb "$kpkg" || fetch "$kpkg"; }
if [ -z "$kpkg" ] || ! have_deb "$kpkg"; then
    # Missing or stale package lists: the mirror may have moved on to a newer kernel.
    ensure_lists
    kpkg=$(cloud_kernel)
    [ -n "$kpkg" ] || die "apt knows no linux-image-cloud-amd64 (no Debian main in the apt sources?)"
    have_deb "$kpkg" || fetch "$kpkg"
fi
have_deb "$kpkg" || die "could not download $kpkg"
kroot=$out/kernel-$kpkg
if [ ! -e "$kroot/.done" ]; then
    rm -rf "$kroot"
    dpkg -x "$(compgen -G "$debs/${kpkg}_*.deb" | head -1)" "$kroot"
    touch "$kroot/.done"
fi
kver=${kpkg#linux-image-}
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz"
mods=$kroot/lib/modules/$kver

# Modules to load, dependencies first, from each module's own "depends=" field (the package
# ships no modules.dep; depmod runs at install time).
declare -A seen=()
order=()
add_module() {
    local name=$1 f dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    f=$(find "$mods" -name "$name.ko" -o -name "${name//_/-}.ko" | head -1)
    [ -n "$f" ] || die "module $name not found in $kpkg"
    for dep in $(grep -a -o 'depends=[a-z0-9_,-]*' "$f" | head -1 | cut -d= -f2 | tr ',' ' '); do
        add_module "$dep"
    done
    order+=("$f")
}
# virtio_net and virtio_pci are modules in the cloud kernel; the test's network needs them.
for m in virtio_pci virtio_net nbd; do add_module "$m"; done

# --- busybox ---
have_deb busybox-static || fetch busybox-static
have_deb busybox-static || { ensure_lists; fetch busybox-static; }
have_deb busybox-static || die "could not download busybox-static"
bbroot=$out/busybox
if [ ! -e "$bbroot/.done" ]; then
    rm -rf "$bbroot"
    dpkg -x "$(compgen -G "$debs/busybox-static_*.deb" | head -1)" "$bbroot"
    touch "$bbroot/.done"
fi

# --- qemu: the installed one, or Debian's unpacked here (installing qemu-system-x86 would
# replace a newer qemu-utils that other tests use) ---
if command -v qemu-system-x86_64 >/dev/null; then
    printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v qemu-system-x86_64)" >"$out/qemu"
else
    qroot=$out/qemu-root
    if [ ! -e "$qroot/.done" ]; then
        installed() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q '^install ok installed'; }
        # qemu-system-x86 and what it needs that is not installed, transitively. The
        # firmware comes from qemu-system-data and seabios; of qemu-system-common only the
        # TCG accelerator module is used, so its many dependencies are not followed.
        declare -A want=([qemu-system-common]=1)
        todo=(qemu-system-x86 qemu-system-data seabios)
        while [ ${#todo[@]} -gt 0 ]; do
            p=${todo[0]}; todo=("${todo[@]:1}")
            [ -n "${want[$p]:-}" ] && continue
            want[$p]=1
            for d in $(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                           --no-replaces --no-enhances "$p" 2>/dev/null |
                       awk '($1 == "Depends:" || $1 == "|Depends:") && $2 !~ /^</ {print $2}'); do
                [ "$d" = qemu-system-common ] && continue
                installed "$d" || todo+=("$d")
            done
        done
        for p in "${!want[@]}"; do have_deb "$p" || fetch "$p"; done
        rm -rf "$qroot"
        for p in "${!want[@]}"; do
            f=$(compgen -G "$debs/${p}_*.deb" | head -1) || die "could not download $p"
            dpkg -x "$f" "$qroot"
        done
        touch "$qroot/.done"
    fi
    libs=$qroot/usr/lib/x86_64-linux-gnu:$qroot/lib/x86_64-linux-gnu
    missing=$(LD_LIBRARY_PATH=$libs ldd "$qroot/usr/bin/qemu-system-x86_64" \
                  "$qroot/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so" | grep 'not found' || true)
    [ -z "$missing" ] || die "the unpacked qemu-system-x86_64 lacks libraries: $missing"
    # Debian's firmware links in /usr/share/qemu are absolute; later -L directories fill in.
    cat >"$out/qemu" <<EOF
#!/bin/sh
QEMU_MODULE_DIR=$qroot/usr/lib/x86_64-linux-gnu/qemu LD_LIBRARY_PATH=$libs exec $qroot/usr/bin/qemu-system-x86_64 -L $qroot/usr/share/qemu -L $qroot/usr/share/seabios "\$@"
EOF
fi
chmod +x "$out/qemu"

# --- the base initramfs ---
root=$out/root
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,lib/modules}
cp "$bbroot/bin/busybox" "$root/bin/busybox"
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
# Binaries and the shared libraries ldd finds for them, at the same paths.
copy_with_libs() {
    local src=$1 dst=$2 lib
    mkdir -p "$(dirname "$root$dst")"
    cp -L "$src" "$root$dst"
    for lib in $(ldd "$src" | grep -o '/[^ ]*' | sort -u); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$(dirname "$root$lib")"
        cp -L "$lib" "$root$lib"
    done
}
copy_with_libs "$(command -v mkfs.ext4 || echo /usr/sbin/mkfs.ext4)" /usr/sbin/mkfs.ext4
[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
copy_with_libs "$tandem" /usr/bin/tandem
# Debug info is most of a debug build's size and of no use in the guest.
if command -v objcopy >/dev/null; then objcopy --strip-debug "$root/usr/bin/tandem"; fi
: >"$root/lib/modules/load"
for f in "${order[@]}"; do
    cp "$f" "$root/lib/modules/"
    echo "/lib/modules/$(basename "$f")" >>"$root/lib/modules/load"
done
cp "$here/init" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out/base.cpio.gz"

cp "$out/base.cpio.gz" "$out/initrd"
if [ -n "$overlay" ]; then
    # The kernel unpacks concatenated archives in order; later files win.
    (cd "$overlay" && find . | cpio -o -H newc --quiet) | gzip -1 >>"$out/initrd"
fi
echo "guest: $kpkg, modules: $(sed 's|.*/||; s|\.ko$||' "$root/lib/modules/load" | tr '\n' ' ')" >&2
