"""Small shared helpers: devices and precision, dataclass configs, progress bars, distributed ranks."""
