"""The ``Client``'s computes, images and environments."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from flowsession.access import USER_IDENTITY
from flowsession.client.http import Http, Progress, q
from flowsession.errors import InvalidInput


class Resources:
    """Mixed into ``Client``; uses its ``_flow_name`` (``Flows``)."""

    _http: Http
    flows_by_path: bool

    # --- computes --------------------------------------------------------------------------

    def list_computes(self) -> list[dict[str, Any]]:
        return self._http.request("GET", "/api/computes")

    def create_compute(self, name: str, *, size: str | None = None,
                       idle_shutdown: str | None = None) -> dict[str, Any]:
        """A compute instance of yours (``size``: a VM size; ``idle_shutdown``: e.g. '2h')."""
        body = {"name": name, "size": size, "idle_shutdown": idle_shutdown}
        return self._http.long("POST", "/api/computes",
                               json={k: v for k, v in body.items() if v is not None})

    def get_compute(self, name: str) -> dict[str, Any]:
        """One compute, with ``sessions``: how many sessions it hosts."""
        return self._http.request("GET", f"/api/computes/{q(name)}")

    def start_compute(self, name: str) -> dict[str, Any]:
        return self._http.long("POST", f"/api/computes/{q(name)}/start")

    def stop_compute(self, name: str) -> dict[str, Any]:
        """Stop a compute instance; the sessions on it stop."""
        return self._http.long("POST", f"/api/computes/{q(name)}/stop")

    def delete_compute(self, name: str) -> dict[str, Any]:
        return self._http.long("DELETE", f"/api/computes/{q(name)}")

    def compute_sizes(self) -> dict[str, Any]:
        """``sizes`` (name, vcpu, memory_bytes, description), ``vcpu_quota``, ``vcpu_in_use``."""
        return self._http.request("GET", "/api/computes/sizes")

    # --- images ----------------------------------------------------------------------------

    def list_images(self) -> list[dict[str, Any]]:
        return self._http.request("GET", "/api/images")

    def get_image(self, ref: str) -> dict[str, Any]:
        """``NAME`` (the newest version) or ``NAME:VERSION``, with ``installed`` packages."""
        return self._http.request("GET", f"/api/images/{quote(ref, safe='/:')}")

    def build_image(self, ref: str, *, on_progress: Progress = None) -> dict[str, Any]:
        return self._http.operation("POST", f"/api/images/{quote(ref, safe='/:')}/build",
                                    on_progress=on_progress)

    def create_image(self, name: str, *, requirements: str | Path | None = None,
                     base: str = "flowsession/runtime", description: str = "",
                     identity: str | None = None, dockerfile: str | Path | None = None,
                     on_progress: Progress = None) -> dict[str, Any]:
        """A custom image: ``base`` plus the packages of the requirements file
        ``requirements``; or what a prompt flow runtime ``dockerfile`` describes (FROM a
        runtime image, COPY requirements.txt, RUN pip install ...)."""
        if dockerfile is not None:
            from flowsession.environments.dockerfile import read_dockerfile

            if requirements is not None:
                raise InvalidInput("give requirements or a Dockerfile, not both",
                                   hint="the Dockerfile's RUN pip install lines are the "
                                        "requirements")
            made = read_dockerfile(Path(dockerfile))
            body: dict[str, Any] = {"name": name, "base": made.base,
                                    "description": description or made.note,
                                    "requirements": made.requirements}
            if identity and identity != USER_IDENTITY:
                body["identity"] = identity
            return self._http.operation("POST", "/api/images", json=body,
                                        on_progress=on_progress)
        if requirements is None:
            raise InvalidInput("an image needs requirements (or a Dockerfile)",
                               hint="give requirements=FILE, or dockerfile=Dockerfile")
        path = Path(requirements).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read the requirements file "
                               f"({type(exc).__name__})", hint="give a readable "
                               "requirements.txt", details={"file": str(path)}) from None
        body = {"name": name, "base": base, "description": description}
        if identity and identity != USER_IDENTITY:
            body["identity"] = identity
        if self.flows_by_path and self._http.can("all:manage"):
            body["requirements_path"] = str(path.resolve())  # its local wheels, its -r files
        else:
            body["requirements"] = text
        return self._http.operation("POST", "/api/images", json=body, on_progress=on_progress)

    def check_image(self, ref: str) -> dict[str, Any]:
        """Does image ``ref`` have a newer version: ``current_version``, ``newest_version``,
        ``newer_available``, ``pinned``."""
        from flowsession.environments.images import parse_ref

        name, version = parse_ref(ref)
        current = self.get_image(ref)
        newest = current if version is None else self.get_image(name)
        return {"image": ref, "name": name, "pinned": version is not None,
                "current_version": current["version"], "newest_version": newest["version"],
                "newer_available": newest["version"] > current["version"]}

    # --- environments ----------------------------------------------------------------------

    def build_environment(self, flow: str | Path, *, refresh: bool = False,
                          identity: str | None = None,
                          on_progress: Progress = None) -> dict[str, Any]:
        """Build (or find) the flow's environment; ``refresh`` resolves the requirements
        again."""
        body: dict[str, Any] = {"refresh": refresh}
        if identity and identity != USER_IDENTITY:
            body["identity"] = identity
        return self._http.operation(
            "POST", f"/api/flows/{q(self._flow_name(flow))}/environment/build", json=body,
            on_progress=on_progress)

    def list_environments(self) -> list[dict[str, Any]]:
        return self._http.request("GET", "/api/environments")

    def get_environment(self, env_id: str) -> dict[str, Any]:
        return self._http.request("GET", f"/api/environments/{q(env_id)}")

    def environment_packages(self, env_id: str) -> list[dict[str, Any]]:
        return self._http.request("GET", f"/api/environments/{q(env_id)}/packages")

    def remove_environment(self, env_id: str) -> dict[str, Any]:
        return self._http.request("DELETE", f"/api/environments/{q(env_id)}")
