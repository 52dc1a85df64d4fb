"""Tags (NAME:TAG -> image ID, kept in the store), image references, and loading indexes."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

from imagefs import chunks as blobs
from imagefs.chunks import Digest
from imagefs.errors import BlobNotFound, ImageNotFound, InvalidReference
from imagefs.index import ImageIndex
from imagefs.store.base import BlobStore

_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def key(self) -> str:
        return f"tags/{self.name}/{self.tag}"


def parse_ref(text: str) -> Ref:
    """NAME[:TAG] with docker's alphabet; the tag defaults to 'latest'."""
    name, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        name, tag = text, "latest"
    if not _NAME.fullmatch(name) or len(name) > 255:
        raise InvalidReference(f"invalid image name {name!r} (lowercase letters, digits, . _ - and /)")
    if not _TAG.fullmatch(tag):
        raise InvalidReference(f"invalid tag {tag!r}")
    return Ref(name, tag)


def read_tag(store: BlobStore, ref: Ref) -> dict[str, Any]:
    """The tag's document; ImageNotFound if there is none, InvalidReference if it is corrupt."""
    try:
        blob = store.get(ref.key)
    except BlobNotFound:
        raise ImageNotFound(f"no image tagged {ref}") from None
    return _tag_document(ref, blob)


def _tag_document(ref: Ref, blob: bytes) -> dict[str, Any]:
    """A tag's bytes as a JSON object naming a valid image ID, or InvalidReference saying why not."""
    try:
        doc = json.loads(blob)
    except ValueError:  # not UTF-8 or not JSON
        raise InvalidReference(f"tag {ref} in the store is corrupt (not valid JSON)") from None
    if not isinstance(doc, dict) or not blobs.is_digest(str(doc.get("image", ""))):
        raise InvalidReference(f"tag {ref} in the store is corrupt (no valid image ID)")
    return doc


def set_tag(store: BlobStore, ref: Ref, image_id: Digest, **extra: Any) -> None:
    """Point ref at image_id. Only call once the index and all its chunks are stored."""
    if not store.exists(blobs.index_key(image_id)):
        raise ImageNotFound(f"image {image_id} is not in the store")
    doc = {"image": image_id, "updated": time.time(), **extra}
    store.put(ref.key, json.dumps(doc, sort_keys=True).encode())


def update_tag(store: BlobStore, ref: Ref, **fields: Any) -> None:
    """Change fields of a tag (e.g. its prefetch profile) without changing the image it names."""
    doc = read_tag(store, ref)
    doc.update(fields)
    store.put(ref.key, json.dumps(doc, sort_keys=True).encode())


def remove_tag(store: BlobStore, ref: Ref) -> None:
    """Delete a tag, a corrupt one too (removing it is how a user gets rid of it)."""
    if not store.exists(ref.key):
        raise ImageNotFound(f"no image tagged {ref}")
    store.delete(ref.key)


def list_tags(store: BlobStore, errors: list[str] | None = None) -> Iterator[tuple[Ref, dict[str, Any]]]:
    """Every readable tag. A corrupt one is skipped; its message goes to errors when given (gc
    and fsck must not take a corrupt tag for no tag)."""
    for info in store.list("tags/"):
        name, _, tag = info.key[len("tags/"):].rpartition("/")
        try:
            ref = Ref(name, tag)
            yield ref, read_tag(store, ref)
        except ImageNotFound:  # removed since it was listed
            continue
        except InvalidReference as e:
            if errors is not None:
                errors.append(str(e))


def resolve(store: BlobStore, text: str) -> Digest:
    """An image ID from NAME:TAG, a full ID, or an unambiguous ID prefix of 12+ hex characters."""
    return resolve_with_tag(store, text)[0]


def resolve_with_tag(store: BlobStore, text: str, *, check_id: bool = True) -> tuple[Digest, dict[str, Any]]:
    """resolve(), and the tag document it read (empty for an ID): one GET for NAME:TAG.

    check_id=False takes a full ID as it is, without asking the store whether the image exists
    (for callers that load its index next, which fails with ImageNotFound just the same).
    """
    if blobs.is_digest(text):
        if check_id and not store.exists(blobs.index_key(text)):
            raise ImageNotFound(f"no image {text}")
        return Digest(text), {}
    if re.fullmatch(r"[0-9a-f]{12,63}", text):
        found = [i.key[len("index/"):] for i in store.list(f"index/{text}")]
        if len(found) == 1:
            return Digest(found[0]), {}
        if len(found) > 1:
            raise InvalidReference(f"image ID prefix {text} is ambiguous")
    doc = read_tag(store, parse_ref(text))
    return Digest(doc["image"]), doc


def tag_profile(store: BlobStore, text: str) -> str:
    """The start-up profile linked from a NAME:TAG (empty for IDs and tags without one)."""
    if blobs.is_digest(text) or re.fullmatch(r"[0-9a-f]{12,63}", text):
        return ""
    try:
        return str(read_tag(store, parse_ref(text)).get("profile") or "")
    except (ImageNotFound, InvalidReference):
        return ""


def load_index(store: BlobStore, image_id: str) -> ImageIndex:
    try:
        blob = store.get(blobs.index_key(image_id))
    except BlobNotFound:
        raise ImageNotFound(f"image index {image_id} is missing from the store") from None
    return ImageIndex.decode(blobs.decode(blob, image_id), image_id)
