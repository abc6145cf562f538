"""A file keyring for `pf connection create` in bench/llm_batch.py: this machine has no keyring
service, and pf keeps its connections' encryption key in the keyring (PYTHON_KEYRING_BACKEND=
pf_keyring.FileKeyring, this folder on PYTHONPATH; the key file lives in the temporary HOME)."""
import json
import os

from keyring.backend import KeyringBackend

PATH = os.path.join(os.path.expanduser("~"), ".bench-keyring.json")


class FileKeyring(KeyringBackend):
    priority = 1

    def _load(self):
        try:
            with open(PATH) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def get_password(self, service, username):
        return self._load().get(f"{service}\0{username}")

    def set_password(self, service, username, password):
        data = self._load()
        data[f"{service}\0{username}"] = password
        with open(PATH, "w") as f:
            json.dump(data, f)

    def delete_password(self, service, username):
        data = self._load()
        data.pop(f"{service}\0{username}", None)
        with open(PATH, "w") as f:
            json.dump(data, f)
