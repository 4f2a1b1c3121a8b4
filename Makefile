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

.PHONY: all venv proto ffi image pal install-pal demo test bench clean

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

bench: venv proto ffi image pal
	$(PY) benchmarks/run.py --images $(BUILD)/images

clean:
	rm -rf $(BUILD) $(FFI) epm_api/*_pb2*.py epm_api/*_pb2.pyi
