import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Native groups reject host-born collective inputs, as nccl/hccl would (megahet/strict_devices.py);
# spawned ranks inherit it. MEGAHET_STRICT_DEVICES=0 turns it off.
os.environ.setdefault("MEGAHET_STRICT_DEVICES", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped where there is none)")
    config.addinivalue_line("markers", "slow: longer than a few seconds")
