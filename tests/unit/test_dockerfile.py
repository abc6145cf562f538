"""A prompt flow runtime Dockerfile read as a custom image (no container is involved)."""

from __future__ import annotations

import pytest

from flowsession.environments.dockerfile import read_dockerfile
from flowsession.environments.images import flow_image, is_promptflow_runtime
from flowsession.errors import InvalidInput


def write(tmp_path, text: str, **files: str):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "Dockerfile").write_text(text)
    return tmp_path / "Dockerfile"


@pytest.mark.parametrize("ref", [
    "mcr.microsoft.com/azureml/promptflow/promptflow-runtime",
    "mcr.microsoft.com/azureml/promptflow/promptflow-runtime:latest",
    "mcr.microsoft.com/azureml/promptflow/promptflow-runtime-stable:20240619.v2",
    "MCR.microsoft.com/azureml/promptflow/promptflow-runtime-stable",
    "azureml/promptflow/promptflow-runtime:20240529.v1",
    "promptflow.azurecr.io/promptflow-runtime",
    "promptflow.azurecr.io/promptflow-runtime:latest",
])
def test_prompt_flows_runtime_images_run_on_the_default_image(ref):
    assert is_promptflow_runtime(ref)
    image, note = flow_image(ref)
    assert image == "flowsession/runtime" and ref in note and "provides promptflow" in note


@pytest.mark.parametrize("ref", ["python:3.11", "mcr.microsoft.com/azureml/other:1",
                                 "flowsession/runtime", "team/rag:2",
                                 "promptflow.azurecr.io/other:1",
                                 "evil.azurecr.io/promptflow-runtime"])
def test_other_images_are_not_taken_for_the_runtime(ref):
    assert not is_promptflow_runtime(ref)


def test_the_azure_dockerfile_becomes_requirements_over_the_default_image(tmp_path):
    path = write(tmp_path, "# the runtime\nFROM mcr.microsoft.com/azureml/promptflow/"
                 "promptflow-runtime:latest\nCOPY ./requirements.txt .\n"
                 "RUN pip install --no-cache-dir -r requirements.txt && \\\n"
                 "    python -m pip install tinybeta==1.0 -i http://127.0.0.1:1/simple\n",
                 **{"requirements.txt": "tinyalpha==1.0\n"})
    made = read_dockerfile(path)
    assert made.base == "flowsession/runtime"
    assert made.requirements == ("tinyalpha==1.0\ntinybeta==1.0\n"
                                 "--index-url http://127.0.0.1:1/simple\n")
    assert "promptflow-runtime:latest" in made.note


@pytest.mark.parametrize("text, named", [
    ("FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime\nRUN apt-get install -y x\n",
     "line 2: RUN apt-get"),
    ("FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime\n\nENV A=1\n",
     "line 3: the ENV instruction"),
    ("FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime\nWORKDIR /app\n",
     "line 2: the WORKDIR instruction"),
    ("FROM python:3.11\n", "line 1: FROM python:3.11 is a container image other than"),
    ("FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime\nRUN pip install -r r.txt\n",
     "line 2: pip install -r r.txt: the file is not COPYed"),
    ("FROM mcr.microsoft.com/azureml/promptflow/promptflow-runtime\nCOPY ../secret .\n",
     "line 2: COPY ../secret: no such file beside the Dockerfile"),
])
def test_anything_else_is_refused_by_name_and_line(tmp_path, text, named):
    with pytest.raises(InvalidInput) as exc:
        read_dockerfile(write(tmp_path, text))
    assert named in exc.value.message
    assert str(tmp_path / "Dockerfile") in exc.value.message

