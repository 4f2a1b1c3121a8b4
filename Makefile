# Two commands matter: `make demo` runs the main job, `make test` runs the
# tests. Each builds what it needs first: the virtual environment, the stubs
# generated from proto/, the skeleton's C declarations, the enclave image and
# its development signing key, and the PAL libraries.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SIZES := 8 32 64 80
BUILD := build
IMAGES := $(foreach s,$(SIZES),$(BUILD)/images/$(s)/encl.ss)
PROTOS := $(wildcard proto/epm_api/*.proto)
STUBS := $(patsubst proto/%.proto,%_pb2.py,$(PROTOS))
ENCLAVE_SRC := $(wildcard skeleton/enclave/*)
PAL_VERSIONS := 1 2 3
PAL_LIBS := $(foreach v,$(PAL_VERSIONS),$(BUILD)/liberpal-skeleton-v$(v).so)
PAL_SRC := $(wildcard skeleton/*.py skeleton/*/*.py epm_client/*.py epm_api/*.py skeleton/capi/*.c skeleton/capi/*.map)
FFI := skeleton/_ffi.py
PREFIX ?= /usr
LIBDIR ?= $(PREFIX)/lib

.PHONY: all venv proto ffi image pal install-pal demo test bench clean go-client \
	go-toolchain

all: venv proto ffi image pal

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

proto: $(STUBS)

epm_api/%_pb2.py: proto/epm_api/%.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
		--grpc_python_out=. $<

# The skeleton's C declarations, parsed once here (cffi out-of-line ABI mode)
# so that importing the skeleton never imports pycparser.
ffi: $(FFI)

$(FFI): skeleton/ffi_build.py $(VENV)/.installed
	$(PY) -m skeleton.ffi_build --out $@

# The enclave image: compiled from skeleton/enclave, then one signed copy per
# size, because the signer writes the mmap size into the image's metadata.
image: $(IMAGES)

$(BUILD)/encl.bin: $(ENCLAVE_SRC) skeleton/build_image.py $(FFI) $(VENV)/.installed
	$(PY) -m skeleton.build_image --out $@

# Generated once: a newer venv or FFI module must not ask for a new key (the
# signer refuses to overwrite one), so they are order-only prerequisites.
$(BUILD)/dev-key.pem: | $(FFI) $(VENV)/.installed
	@mkdir -p $(BUILD)
	$(VENV)/bin/sgxsign --genkey $@

$(BUILD)/images/%/encl.ss: $(BUILD)/encl.bin $(BUILD)/dev-key.pem $(STUBS) \
		skeleton/sgxsign.py skeleton/measure.py skeleton/structs.py
	@mkdir -p $(dir $@)
	cp $(BUILD)/encl.bin $(dir $@)encl.bin
	$(VENV)/bin/sgxsign -s $$(($* * 1024 * 1024)) $(BUILD)/dev-key.pem \
		$(dir $@)encl.bin $@

# The PAL libraries rune loads. Each embeds this venv's Python, with the
# checkout and the venv's site-packages baked in (skeleton/capi/build.py).
pal: $(PAL_LIBS)

$(BUILD)/liberpal-skeleton-v%.so: $(PAL_SRC) $(FFI) $(VENV)/.installed
	$(PY) -m skeleton.capi.build --version $* --out $@

# Copies the libraries only: they find Python and the project through the
# paths baked into them, so this checkout and .venv must stay in place.
install-pal: pal
	install -d $(DESTDIR)$(LIBDIR)
	install -m 0755 $(PAL_LIBS) $(DESTDIR)$(LIBDIR)/

demo: venv proto ffi image pal
	$(PY) scripts/demo.py --images $(BUILD)/images

test: venv proto ffi image pal
	$(PY) -m pytest -q

# The Go client's figures come too when its toolchain is installed.
bench: venv proto ffi image pal
	@$(MAKE) --no-print-directory go-client >/dev/null 2>&1 || \
		echo "make bench: no Go client (make go-client says what is missing)"
	$(PY) benchmarks/run.py --images $(BUILD)/images

# A Go client of the published clients' path, for benchmarks/run.py (which
# times it when build/epm-go-client exists). Built offline from Debian's
# packaged sources in GOPATH mode: nothing is fetched, so no go.mod. The
# generated code goes to build/, never into the tree; the proto names no
# go_package, so protoc's M options give it an import path, and map any.proto
# to the golang/protobuf 1.3 package that Debian's protoc-gen-go pairs with
# (protoc's own any.proto names the newer google.golang.org/protobuf).
GO_DEBS := golang-go golang-google-grpc-dev golang-goprotobuf-dev protobuf-compiler
GOCODE ?= /usr/share/gocode
GO_CLIENT := $(BUILD)/epm-go-client
GO_SRC := $(BUILD)/gopath/src/epmbench
GO_PB := $(GO_SRC)/epm_api/v1alpha1.pb.go
# `$\` ends a line without the space a plain backslash would leave.
GO_PROTOC_OPTS := plugins=grpc,$\
	Mgoogle/protobuf/any.proto=github.com/golang/protobuf/ptypes/any,$\
	Mepm_api/v1alpha1.proto=epmbench/epm_api
GO_ENV := GO111MODULE=off GOPROXY=off GOFLAGS= \
	GOPATH=$(abspath $(BUILD)/gopath):$(GOCODE) GOCACHE=$(abspath $(BUILD)/gocache)

go-client: $(GO_CLIENT)

$(GO_CLIENT): benchmarks/go_client/main.go $(GO_PB) | go-toolchain
	cd benchmarks/go_client && $(GO_ENV) go build -o $(abspath $@) .

$(GO_PB): proto/epm_api/v1alpha1.proto | go-toolchain
	@mkdir -p $(GO_SRC)
	protoc -Iproto --go_out=$(GO_PROTOC_OPTS):$(GO_SRC) $<

# Checked on every build (order-only: it never makes the client out of date).
go-toolchain:
	@missing=; \
	for tool in go protoc protoc-gen-go; do \
		command -v $$tool >/dev/null || missing="$$missing $$tool"; \
	done; \
	for pkg in google.golang.org/grpc github.com/golang/protobuf/proto \
			golang.org/x/sys/unix; do \
		test -d $(GOCODE)/src/$$pkg || missing="$$missing $(GOCODE)/src/$$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "make go-client: missing$$missing" >&2; \
		echo "  install the Debian packages: apt-get install $(GO_DEBS)" >&2; \
		exit 1; \
	fi

clean:
	rm -rf $(BUILD) $(FFI) epm_api/*_pb2*.py epm_api/*_pb2.pyi
