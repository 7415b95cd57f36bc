"""Finding images: ImageFolder labels, training manifests, and the stratified split."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcls import lake
from distcls.storage import Store
from distcls.errors import UsageError
from distcls.lake import labelled_images, list_files, read_manifest, stratified_split


def _touch(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_imagefolder_classes_are_the_first_folder_and_sorted(tmp_path) -> None:
    _touch(tmp_path, ["dog/1.jpg", "cat/a/2.PNG", "cat/3.jpeg", "dog/notes.txt", "_tmp/x.jpg", ".hidden/y.jpg", "loose.jpg"])
    table, classes = labelled_images(Store(str(tmp_path)))
    assert classes == ["cat", "dog"]
    got = {p.removeprefix(str(tmp_path) + "/"): classes[i] for p, i in zip(table["path"].to_pylist(), table["label"].to_pylist())}
    assert got == {"cat/a/2.PNG": "cat", "cat/3.jpeg": "cat", "dog/1.jpg": "dog"}


def test_training_manifest_with_relative_paths(tmp_path) -> None:
    _touch(tmp_path, ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg"])
    (tmp_path / "train.csv").write_text("path,label,extra\nimgs/a.jpg,cat,1\nimgs/b.jpg,dog,2\nimgs/c.jpg,cat,3\n")
    table, classes = labelled_images(Store(str(tmp_path / "train.csv")))
    assert classes == ["cat", "dog"]
    assert table["path"].to_pylist() == [str(tmp_path / "imgs" / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert table["label"].to_pylist() == [0, 1, 0]

    pq.write_table(pa.table({"path": [str(tmp_path / "imgs/a.jpg")], "label": ["zebra"]}), tmp_path / "val.parquet")
    with pytest.raises(UsageError, match="zebra"):
        labelled_images(Store(str(tmp_path / "val.parquet")), classes)


def test_manifest_without_label_column_is_refused_for_training(tmp_path) -> None:
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    with pytest.raises(UsageError, match="'label' column"):
        labelled_images(Store(str(tmp_path / "m.csv")))


def test_listing_is_sorted_with_sizes(tmp_path) -> None:
    _touch(tmp_path, ["b.jpg", "a.png", "c.gif"])
    table = list_files(Store(str(tmp_path)), [".jpg", ".png"])
    assert [p.rsplit("/", 1)[1] for p in table["path"].to_pylist()] == ["a.png", "b.jpg"]
    assert table["size"].to_pylist() == [1, 1]


def test_an_s3_prefix_is_listed_page_by_page_each_object_once(s3_bucket: str, monkeypatch) -> None:
    """Pages of 2 keys (one ListObjectsV2 request each): a page that ends inside a folder loses
    nothing, no object comes twice, hidden names, folder markers and a sibling prefix stay out, and
    sizes and mtimes are pyarrow's (the keys of --incremental written by earlier runs)."""
    import boto3

    client = boto3.client("s3")
    objects = ["lake/.h.jpg", "lake/a/1.jpg", "lake/a/2.jpg", "lake/a/3.jpg", "lake/a/7.JPG", "lake/b/4.jpg",
               "lake/b/_x/5.jpg", "lake/c/", "lake/notes.txt", "lake2/6.jpg"]
    for i, key in enumerate(objects):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x" * i)
    pages: list[list[str]] = []
    s3_pages = lake._s3_pages

    def recording(*args):
        for page in s3_pages(*args):
            pages.append([entry["Key"] for entry in page])
            yield page

    monkeypatch.setattr(lake, "LIST_PAGE_KEYS", 2)
    monkeypatch.setattr(lake, "_s3_pages", recording)
    listing = pa.concat_tables(lake.list_chunks(Store(f"s3://{s3_bucket}/lake"), chunk_rows=3))

    assert pages == [objects[i:min(i + 2, 9)] for i in range(0, 9, 2)]  # a/1 | a/2: a page boundary inside a/
    expected = [f"s3://{s3_bucket}/lake/{name}" for name in ("a/1.jpg", "a/2.jpg", "a/3.jpg", "a/7.JPG", "b/4.jpg")]
    assert listing["path"].to_pylist() == expected
    bucket = Store(f"s3://{s3_bucket}")
    infos = bucket.fs.get_file_info([path.removeprefix("s3://") for path in expected])
    assert listing["size"].to_pylist() == [info.size for info in infos] == [1, 2, 3, 4, 5]
    assert listing["mtime"].to_pylist() == [info.mtime_ns for info in infos]


def test_stratified_split_is_deterministic_and_per_class() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, val = stratified_split(labels, 0.1, seed=3)
    again_train, again_val = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert sorted(np.bincount(labels[val]).tolist()) == [2, 3, 5]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 100
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])


def test_listing_enters_no_symlinked_folder_and_lists_each_file_once(tmp_path) -> None:
    """pyarrow's recursive listing follows symlinks: ``sub/loop -> ..`` gave ``sub/a.jpg`` 41
    rows (until ELOOP), and two linked folders never finished. Here a linked folder is never
    entered, whether it loops or leads out of the lake; a link to a regular file is listed under
    its own name; dangling links, link loops and FIFOs are skipped."""
    lake, outside = tmp_path / "lake", tmp_path / "outside"
    _touch(lake, ["sub/a.jpg", "b.jpg"])
    _touch(outside, ["secret.jpg"])
    (lake / "sub" / "loop").symlink_to("..")
    (lake / "out").symlink_to(outside)
    (lake / "alias.jpg").symlink_to(lake / "sub" / "a.jpg")
    (lake / "dangling.jpg").symlink_to(tmp_path / "nothing.jpg")
    (lake / "self.jpg").symlink_to(lake / "self.jpg")
    os.mkfifo(lake / "fifo.jpg")
    table = list_files(Store(str(lake)))
    assert table["path"].to_pylist() == [str(lake / n) for n in ("alias.jpg", "b.jpg", "sub/a.jpg")]
    assert table["size"].to_pylist() == [1, 1, 1]


def test_listing_from_a_symlinked_root_and_an_unreadable_folder(tmp_path) -> None:
    _touch(tmp_path / "real", ["a.jpg", "locked/b.jpg"])
    (tmp_path / "link").symlink_to(tmp_path / "real")  # the root the user named is followed
    assert list_files(Store(str(tmp_path / "link")), [".jpg"])["path"].to_pylist()[0] == \
        str(tmp_path / "link" / "a.jpg")
    (tmp_path / "real" / "locked").chmod(0)
    try:
        if os.access(tmp_path / "real" / "locked", os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(UsageError, match=f"^{tmp_path / 'link'}: .*[Pp]ermission denied"):
            list_files(Store(str(tmp_path / "link")))
    finally:
        (tmp_path / "real" / "locked").chmod(0o755)


def test_manifest_paths_are_normalised(tmp_path) -> None:
    """``a.jpg``, ``./a.jpg``, ``x/../a.jpg``, ``.//a.jpg``, a doubled slash and file:// name one
    file and read as one path; ``//a.jpg`` is the absolute ``/a.jpg``, as the OS reads it."""
    lake = tmp_path / "lake"
    _touch(lake, ["a.jpg"])
    entries = ["a.jpg", "./a.jpg", "x/../a.jpg", ".//a.jpg", f"{lake}//a.jpg", f"file://{lake}/./a.jpg", "//a.jpg",
               "s3://bucket/lake/../a.jpg"]
    pq.write_table(pa.table({"path": entries}), lake / "m.parquet")
    paths = read_manifest(Store(str(lake / "m.parquet")))["path"].to_pylist()
    assert paths == [str(lake / "a.jpg")] * 6 + ["/a.jpg", "s3://bucket/lake/../a.jpg"]
