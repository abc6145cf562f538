from promptflow.contracts.multimedia import Image
from promptflow.core import tool


@tool
def tag(image: Image, label: str) -> dict:
    # the image it was given, and a new one made of bytes
    return {"label": label, "image": image, "made": Image(b"GIF89a-" + label.encode(), mime_type="image/gif")}
