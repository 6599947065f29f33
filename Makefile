# zc: `make run` boots the default guest and prints its report; `make test` runs
# every test (unit, KVM, end-to-end). Both install what they need first.

CARGO        ?= cargo
HOST_TARGET  := x86_64-unknown-linux-gnu
RELEASE_DIR  := target/release
GUEST_BIN    := target/$(HOST_TARGET)/release/zc-guest
ZC_VMM       := $(RELEASE_DIR)/zc-vmm
ZC_IMAGE     := $(RELEASE_DIR)/zc-image
IMAGES_OUT   := images/out
GUEST_KERNEL := $(IMAGES_OUT)/guest/vmlinuz
GUEST_INITRD := $(IMAGES_OUT)/guest/initrd.img
# A user's own kernel: make run KERNEL=path/to/bzImage [MODULES=path/to/lib/modules/<release>]
KERNEL       ?=
MODULES      ?=
# Pin a Debian kernel, e.g. KERNEL_VERSION=6.12
KERNEL_VERSION ?=
# Your kernel tree: make run KERNEL_TREE=path/to/linux builds it with its own .config
# (make olddefconfig bzImage [modules]) and stages image, config and modules in
# $(KERNEL_TREE_OUT); KERNEL_TREE_BUILD=no uses what the tree has built.
KERNEL_TREE  ?=
KERNEL_TREE_BUILD ?= yes
KERNEL_TREE_OUT := $(IMAGES_OUT)/kernel-tree
# make kernel: a kernel built from source (Debian's linux-source-6.1 unless
# KERNEL_SOURCE=linux.tar.xz), tinyconfig + images/kconfig/zc-{guest,trim}.config, after
# KERNEL_PATCHES (files or directories of *.patch, applied in order); cached in
# ~/.cache/zc/kernels, staged in $(KERNEL_OUT); boot it with KERNEL=$(KERNEL_OUT)/vmlinuz.
KERNEL_SOURCE  ?=
KERNEL_PATCHES ?=
KERNEL_OUT   := $(IMAGES_OUT)/kernel
METHODS_OUT  ?= out/methods
# `make run` runs every method, as the README's first line says (a list, e.g.
# RUN_METHODS=sendfile,splice, for fewer).
RUN_METHODS  ?= all
APT_PACKAGES := qemu-system-x86 e2fsprogs iproute2
# What `make kernel` and KERNEL_TREE= builds need (images/src/kbuild/mod.rs
# BUILD_PACKAGES, plus the default source).
KERNEL_APT_PACKAGES := linux-source-6.1 gcc make flex bison bc libelf-dev libssl-dev xz-utils patch kmod

ifneq ($(KERNEL_TREE),)
KERNEL       := $(KERNEL_TREE_OUT)/vmlinuz
KERNEL_PREP  := kernel-tree
# The staged modules exist only when the tree's config has modules: tested when run.
GUEST_KERNEL_ARGS := --kernel $(KERNEL) \
  $$(test -d $(KERNEL_TREE_OUT)/modules && echo --modules-dir $(KERNEL_TREE_OUT)/modules)
else ifneq ($(KERNEL),)
GUEST_KERNEL_ARGS := --kernel $(KERNEL) $(if $(MODULES),--modules-dir $(MODULES))
else
GUEST_KERNEL_ARGS := $(if $(KERNEL_VERSION),--kernel-version $(KERNEL_VERSION))
endif

.PHONY: all deps kernel-deps build guest images kernel kernel-tree run boot matrix regression test unit-test e2e-test bench fuzz fuzz-build fuzz-stats fuzz-seeds flake fmt clippy clean check-config config-fragment kunit

all: build

## deps: install the Debian packages the harness needs (as root), or say how.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "make: missing packages; run: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi
	@apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q 'Candidate: [0-9]' || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq; else echo "make: run: sudo apt-get update"; exit 1; fi; }

## kernel-deps: what building a kernel needs (the source package, compiler, tools).
kernel-deps:
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(KERNEL_APT_PACKAGES)"

## kernel: build a small kernel from source (cached: a rerun with the same inputs costs nothing).
kernel: kernel-deps build
	$(ZC_IMAGE) build-kernel $(if $(KERNEL_SOURCE),--source $(KERNEL_SOURCE)) \
	  $(foreach p,$(KERNEL_PATCHES),--patch $(p)) --out $(KERNEL_OUT)

# KERNEL_TREE=path: build (unless KERNEL_TREE_BUILD=no) and stage the user's tree.
kernel-tree: build
	$(ZC_IMAGE) build-kernel --tree $(KERNEL_TREE) $(if $(filter no,$(KERNEL_TREE_BUILD)),--no-build) \
	  --out $(KERNEL_TREE_OUT)

## build: the VMM and the image tool (release: they run inside an emulated host).
build:
	$(CARGO) build --release -p zc-vmm -p zc-images

## guest: the static /init program.
guest:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p zc-guest --target $(HOST_TARGET)

## images: kernels (fetched from Debian, cached) and initramfs for the guest and the emulated host.
images: deps build guest $(KERNEL_PREP)
	$(ZC_IMAGE) build --role guest --init $(GUEST_BIN) $(GUEST_KERNEL_ARGS) --out $(IMAGES_OUT)
	$(if $(KERNEL),,$(ZC_IMAGE) vmlinux --kernel $(GUEST_KERNEL) --out $(IMAGES_OUT)/guest/vmlinux)
	$(ZC_IMAGE) build --role host --init $(GUEST_BIN) --out $(IMAGES_OUT)
	$(ZC_IMAGE) disk --out $(IMAGES_OUT)/guest/disk.img

## run: boot the default guest and print its report.
# The main job: every transfer method, both NIC variants, audited against
# audit/expected.toml; prints the verdict table (reports in out/methods/).
run: images
	$(ZC_VMM) methods --kernel $(GUEST_KERNEL) --initrd $(GUEST_INITRD) \
	  --disk $(IMAGES_OUT)/guest/disk.img --payload $(IMAGES_OUT)/guest/disk-files/payload.bin \
	  --methods $(RUN_METHODS) --out $(METHODS_OUT)

# Just boot the default guest and print what it reports.
boot: images
	$(ZC_VMM) run --kernel $(GUEST_KERNEL) --initrd $(GUEST_INITRD)

# The suite on each of Debian's kernels, one table per kernel side by side.
MATRIX_KERNELS ?= 6.1 6.12
matrix: deps build guest
	$(ZC_IMAGE) build --role host --init $(GUEST_BIN) --out $(IMAGES_OUT)
	@status=0; dirs=""; for v in $(MATRIX_KERNELS); do \
	  out=$(IMAGES_OUT)/matrix-$$v; \
	  $(ZC_IMAGE) build --role guest --init $(GUEST_BIN) --kernel-version $$v --out $$out || exit 1; \
	  $(ZC_IMAGE) disk --out $$out/guest/disk.img || exit 1; \
	  $(ZC_VMM) methods --kernel $$out/guest/vmlinuz --initrd $$out/guest/initrd.img \
	    --disk $$out/guest/disk.img --payload $$out/guest/disk-files/payload.bin \
	    --methods all --out out/matrix/$$v || status=1; \
	  dirs="$$dirs out/matrix/$$v"; \
	done; \
	$(ZC_VMM) compare $$dirs; exit $$status

## regression: build a kernel with each regression patch (images/regressions/*.patch;
## rebuilt incrementally in `make kernel`'s tree, cached), run the suite on it and on the
## unpatched kernel, print them side by side; each patched kernel must FAIL exactly the
## rows its Zc-Fails trailers name and PASS the others (exit 1 otherwise).
REGRESSION_PATCHES ?= $(sort $(wildcard images/regressions/*.patch))
REGRESSION_IMAGES  := $(IMAGES_OUT)/regression
REGRESSION_OUT     := out/regression

regression: images kernel
	$(ZC_IMAGE) build --role guest --init $(GUEST_BIN) --kernel $(KERNEL_OUT)/vmlinuz --out $(REGRESSION_IMAGES)/unpatched
	@for p in $(REGRESSION_PATCHES); do n=$$(basename $$p .patch); \
	  $(ZC_IMAGE) build-kernel --patch $$p --out $(REGRESSION_IMAGES)/$$n/kernel || exit 1; \
	  $(ZC_IMAGE) build --role guest --init $(GUEST_BIN) --kernel $(REGRESSION_IMAGES)/$$n/kernel/vmlinuz \
	    --out $(REGRESSION_IMAGES)/$$n || exit 1; \
	done
	@dirs=""; predictions=""; for p in unpatched $(REGRESSION_PATCHES); do n=$$(basename $$p .patch); \
	  echo "== the suite on the $$n kernel"; \
	  $(ZC_VMM) methods --kernel $(REGRESSION_IMAGES)/$$n/guest/vmlinuz --initrd $(REGRESSION_IMAGES)/$$n/guest/initrd.img \
	    --disk $(IMAGES_OUT)/guest/disk.img --payload $(IMAGES_OUT)/guest/disk-files/payload.bin \
	    --methods send --sg-off-methods send --out $(REGRESSION_OUT)/$$n > /dev/null; \
	  dirs="$$dirs $(REGRESSION_OUT)/$$n"; \
	  [ $$p = unpatched ] || predictions="$$predictions --expected-fails $(REGRESSION_OUT)/$$n=$$p"; \
	done; \
	$(ZC_VMM) compare $$dirs $$predictions

## test: unit tests, KVM tests and the end-to-end boots of the real kernel.
# The source-built kernel (`make kernel`: virtio-pci only) with its own initramfs,
# for the end-to-end test that runs it on the PCI transport; and the same kernel with
# one regression patch, for the test that it fails exactly the rows the patch names.
SOURCE_KERNEL_IMAGES := $(IMAGES_OUT)/source-kernel
REGRESSION_TEST_PATCH := images/regressions/tcp-zerocopy-copies-small-sends.patch
REGRESSION_TEST_IMAGES := $(IMAGES_OUT)/regression-test

test: images kunit kernel
	$(ZC_IMAGE) build --role guest --init $(GUEST_BIN) --kernel $(KERNEL_OUT)/vmlinuz --out $(SOURCE_KERNEL_IMAGES)
	$(ZC_IMAGE) build-kernel --patch $(REGRESSION_TEST_PATCH) --out $(REGRESSION_TEST_IMAGES)/kernel
	$(ZC_IMAGE) build --role guest --init $(GUEST_BIN) --kernel $(REGRESSION_TEST_IMAGES)/kernel/vmlinuz --out $(REGRESSION_TEST_IMAGES)
	ZC_KUNIT_DIR=$(KUNIT_DIR) $(CARGO) test --workspace --release
	ZC_REQUIRE_KERNEL_CACHE=1 $(CARGO) test --release -p zc-images --test real_kernels --test real_vmlinux -- --ignored
	@if [ "$$(id -u)" = 0 ] && [ -c /dev/net/tun ]; then \
	  $(CARGO) test --release -p zc-devices --lib net_tap -- --ignored; \
	else echo "make: tap backend tests not run: they need root and /dev/net/tun"; fi
	ZC_IMAGES=$(CURDIR)/$(IMAGES_OUT) ZC_SOURCE_KERNEL_IMAGES=$(CURDIR)/$(SOURCE_KERNEL_IMAGES) \
	  ZC_REGRESSION_IMAGES=$(CURDIR)/$(REGRESSION_TEST_IMAGES) ZC_REGRESSION_PATCH=$(CURDIR)/$(REGRESSION_TEST_PATCH) \
	  $(CARGO) test --release -p zc-vmm --test boot --test devices --test methods --test transports --test regression \
	  -- --ignored --test-threads=1

## check-config: the preflight of a kernel's config, before any boot: one line per
## missing option and what breaks, and the methods it will SKIP.
## KERNEL=bzImage|vmlinux|source tree|unpacked package [MODULES=lib/modules/<release>];
## without KERNEL: every Debian kernel in images/cache.
check-config: build $(KERNEL_PREP)
	@if [ -n "$(KERNEL_TREE)" ]; then \
	  $(ZC_IMAGE) check-config $(KERNEL) $$(test -d $(KERNEL_TREE_OUT)/modules && echo --modules-dir $(KERNEL_TREE_OUT)/modules); \
	elif [ -n "$(KERNEL)" ]; then \
	  $(ZC_IMAGE) check-config $(KERNEL) $(if $(MODULES),--modules-dir $(MODULES)); \
	else status=0; for k in images/cache/*/; do \
	  [ -f $$k/kernel.json ] || continue; $(ZC_IMAGE) check-config $$k || status=$$?; \
	done; exit $$status; fi

## config-fragment: the Kconfig fragment a zc guest kernel needs, for the kernel's
## scripts/kconfig/merge_config.sh.
config-fragment: build
	@$(ZC_IMAGE) config-fragment

## kunit: the kernel's KTAP parser (tools/testing/kunit/kunit.py) and ktap.rst, from
# Debian's linux-source package, extracted (only those) into a cache outside the
# clone; `make test` checks the verdicts' KTAP with it.
KUNIT_SOURCE  := linux-source-6.1
KUNIT_DIR     ?= $(HOME)/.cache/zc/kunit-6.1
kunit:
	@test -f $(KUNIT_DIR)/tools/testing/kunit/kunit.py || { \
	  tarball=$$(ls /usr/src/$(KUNIT_SOURCE).tar.xz 2>/dev/null); \
	  if [ -z "$$tarball" ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(KUNIT_SOURCE) >/dev/null || exit 1; \
	    else echo "make: run: sudo apt-get install $(KUNIT_SOURCE)"; exit 1; fi; \
	    tarball=/usr/src/$(KUNIT_SOURCE).tar.xz; \
	  fi; \
	  mkdir -p $(KUNIT_DIR) && tar -xJf $$tarball -C $(KUNIT_DIR) --strip-components=1 --wildcards \
	    '$(KUNIT_SOURCE)/Documentation/dev-tools/ktap.rst' '$(KUNIT_SOURCE)/tools/testing/kunit/*'; }

## bench: zc-vmm beside QEMU microvm (same kernel, initramfs and command line): boot
## time, disk read and TCP send as zc/QEMU ratios, and the DMA log's on/off ratios
## (docs/bench.md; QEMU's card needs root for its tap). The figures as JSON: $(BENCH_OUT)/bench.json.
BENCH_OUT ?= out/bench
bench: images
	mkdir -p $(BENCH_OUT)
	ZC_IMAGES=$(CURDIR)/$(IMAGES_OUT) $(CARGO) run --release -p zc-vmm --bin zc-bench -- --json $(BENCH_OUT)/bench.json

## fuzz: run each cargo-fuzz target of fuzz/ for FUZZ_SECONDS seconds (or FUZZ_RUNS
## inputs when set), one at a time, each input limited to 5 s; prints the table of
## executions, coverage, crashes and timeouts (docs/fuzzing.md) and fails on any
## crash or timeout. fuzz-stats: the deep-path counters over seeds + corpus;
## fuzz-seeds: minimise the corpus into the committed seeds. Not part of `test`.
## Stable Rust needs RUSTC_BOOTSTRAP=1 for cargo-fuzz's -Z flags.
FUZZ_SECONDS ?= 600
FUZZ_RUNS ?= 0
FUZZ_TARGETS := blk_queue net_queue mmio_regs control dma_log images expect_toml net_peer
fuzz-build:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -O

fuzz: fuzz-build
	scripts/fuzz.sh run $(FUZZ_SECONDS) $(FUZZ_RUNS) $(FUZZ_TARGETS)

fuzz-stats: fuzz-build
	scripts/fuzz.sh stats $(FUZZ_TARGETS)

fuzz-seeds: fuzz-build
	scripts/fuzz.sh seeds $(FUZZ_TARGETS)

## flake: boot the method suite FLAKE_RUNS times in a row and classify every run that
## did not pass (guest, harness, emulated host), with the emulated host's retries
## counted (scripts/flake-rate; reports in out/flake/<run>/, table in out/flake/summary.txt).
FLAKE_RUNS ?= 20
flake: images
	scripts/flake-rate --runs $(FLAKE_RUNS)

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(IMAGES_OUT) out
