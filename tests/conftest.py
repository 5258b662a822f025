import os

# Tests run on the CPU; several host "devices" let the local-device tests run on one machine.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
