from promptflow.core import tool


@tool
def table(name: str) -> str:
    import xmltodict  # installed from ../shared_requirements/requirements.txt

    return xmltodict.unparse({"greeting": {"@to": name, "#text": "hello"}}, full_document=False)
