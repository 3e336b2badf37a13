"""flexrank.device_profiles: one YAML file per device, shipped as package data.

The schema is documented and enforced in `flexrank.device.profiles`.
"""

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent
