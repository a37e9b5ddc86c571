"""The names under which a skipped sample is counted.

These strings appear in `_stats.json`, `{split}_index.json` and the job summary; they are
stable: add new ones, never rename.

Counted while planning (the entry never gets a key):
- `bad_manifest_line`: a manifest line that is not valid JSON / CSV, not an object, or has
  no path or no label field.
- `unknown_label`: a label name not in `classes_file`, or an integer label outside the
  class list.

Counted inside a shard task (the entry's key is left unused in the shard):
- `missing_file`: the file (or per-class tar) does not exist.
- `read_error`: the file exists but could not be read (permissions, a directory, I/O error).
- `empty_file`: zero bytes.
- `not_an_image`: bytes Pillow does not recognise as any image format (e.g. text named .jpg).
- `too_many_pixels`: width*height above `image.max_pixels` (decompression-bomb guard; the
  image is never decoded). Pillow's own limit, 2x `PIL.Image.MAX_IMAGE_PIXELS`, also applies.
- `truncated_image`: the header parses but the pixel data ends early.
- `decode_error`: any other failure to decode the pixel data.
- `process_error`: converting, resizing or encoding a decoded image failed.

Not failures: CMYK, palette, LA/RGBA (composited on white), 16-bit and 1-channel images
are converted to RGB and counted under `converted_modes` in the shard stats.
"""

BAD_MANIFEST_LINE = "bad_manifest_line"
UNKNOWN_LABEL = "unknown_label"
MISSING_FILE = "missing_file"
READ_ERROR = "read_error"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED_IMAGE = "truncated_image"
DECODE_ERROR = "decode_error"
PROCESS_ERROR = "process_error"

ALL = (
    BAD_MANIFEST_LINE,
    UNKNOWN_LABEL,
    MISSING_FILE,
    READ_ERROR,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    TOO_MANY_PIXELS,
    TRUNCATED_IMAGE,
    DECODE_ERROR,
    PROCESS_ERROR,
)


class SampleError(Exception):
    """One sample cannot go into a shard; `reason` is one of the names above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
