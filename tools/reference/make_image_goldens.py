#!/usr/bin/env python3
"""Golden files for tests/test_image.c and tests/test_image_preprocess.c.

Writes deterministic input images (PNG and JPEG in the modes the decoder must handle) to
tests/golden/image/ and, for each, what the reference pipeline makes of it:

    PIL.Image.open -> PIL.ImageOps.exif_transpose -> transformers' convert_to_rgb   (decoded RGB)
    -> Qwen2VLImageProcessorPil (the slow Pillow processor)                          (pixel_values)

manifest.txt, one record a line (digests are the first 16 bytes of SHA-256, hex, over
u32le width || u32le height || bytes, the same as dg_image_hash()):
    decode  FILE W H RGB_DIGEST
    resize  FILE W H RESIZED_RGB_DIGEST         Pillow resize((W, H), BICUBIC) of the decoded RGB
    refuse  FILE                                Pillow refuses to open it
    patches FILE MIN MAX GT GH GW DIGEST BIN    DIGEST over the float32 pixel_values viewed as
                                                width 1568 (= 1176*4/3) x rows; BIN is "-" or a
                                                file with the first temporal half of each row
                                                (float32 LE [rows, 588]); the script checks the
                                                halves are equal, so nothing is lost

Run: tools/reference/.venv/bin/python tools/reference/make_image_goldens.py
"""
import hashlib
import io
import os
import struct
import sys

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin
from transformers.image_transforms import convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "golden", "image")
SMALL = (56 * 56, 28 * 28 * 16)          # lowered limits: at most 64 patches, stored as .bin
DEFAULT = (3136, 12845056)               # Qwen2.5-VL preprocessor_config.json


def digest(w, h, data):
    return hashlib.sha256(struct.pack("<II", w, h) + data).hexdigest()[:32]


def picture(w, h, seed, channels=3):
    """Smooth shapes plus some noise: compresses well, still exercises every filter tap."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = []
    for c in range(channels):
        fx, fy, ph = rng.uniform(0.02, 0.3), rng.uniform(0.02, 0.3), rng.uniform(0, 6.3)
        v = 128 + 90 * np.sin(fx * x + ph) * np.cos(fy * y) + 30 * ((x + 2 * y + 7 * c) % 37 < 5)
        v += rng.normal(0, 6, size=(h, w))
        planes.append(v)
    a = np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)
    return a if channels > 1 else a[..., 0]


def exif_bytes(orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def make_inputs():
    """name -> encoded bytes."""
    files = {}

    def save(name, im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        files[name] = buf.getvalue()

    save("rgb_57x91.png", Image.fromarray(picture(57, 91, 1)), "PNG")
    save("rgb_300x31.png", Image.fromarray(picture(300, 31, 2)), "PNG")
    save("rgb_31x300.png", Image.fromarray(picture(31, 300, 3)), "PNG")
    save("rgb_1000x29.png", Image.fromarray(picture(1000, 29, 4)), "PNG")
    save("rgb_13x17.png", Image.fromarray(picture(13, 17, 5)), "PNG")
    save("rgb_640x427.jpg", Image.fromarray(picture(640, 427, 6)), "JPEG", quality=90)
    save("rgb_97x97_444p.jpg", Image.fromarray(picture(97, 97, 7)), "JPEG", quality=85,
         subsampling=0, progressive=True)
    save("rgb_123x57_422.jpg", Image.fromarray(picture(123, 57, 8)), "JPEG", quality=80, subsampling=1)
    save("gray_333x222.jpg", Image.fromarray(picture(333, 222, 9, 1), "L"), "JPEG", quality=90)
    save("cmyk_64x40.jpg", Image.fromarray(picture(64, 40, 10, 4), "CMYK"), "JPEG", quality=90)
    rgba = picture(150, 100, 11, 4)
    rgba[:20, :, 3] = 0                                   # fully transparent band
    rgba[20:40, :, 3] = 255
    save("rgba_150x100.png", Image.fromarray(rgba, "RGBA"), "PNG")
    save("la_90x60.png", Image.fromarray(picture(90, 60, 12, 2), "LA"), "PNG")
    pal = Image.fromarray(picture(64, 48, 13)).quantize(colors=200, method=Image.Quantize.MEDIANCUT)
    pal.info["transparency"] = bytes((i * 37) % 256 for i in range(120))
    save("pal_64x48_trns.png", pal, "PNG", transparency=pal.info["transparency"])
    pal4 = Image.fromarray(picture(70, 50, 14)).quantize(colors=16)
    save("pal4_70x50.png", pal4, "PNG", bits=4)
    save("gray1_41x53.png", Image.fromarray(picture(41, 53, 15, 1) > 128), "PNG")
    key = Image.fromarray(picture(40, 30, 16))
    k = tuple(int(v) for v in np.array(key)[5, 7])
    save("rgb_trns_40x30.png", key, "PNG", transparency=k)
    rgb16 = (picture(100, 70, 17).astype(np.uint16) * 257 + 99).astype(">u2")
    # Pillow cannot write 16-bit RGB: write the PNG by hand
    files["rgb16_100x70.png"] = png_raw(100, 70, 16, 2, rgb16.tobytes(), 6)
    g16 = (picture(50, 50, 18, 1).astype(np.uint16) * 2).astype(">u2")   # 0..510: clipping shows
    files["gray16_50x50.png"] = png_raw(50, 50, 16, 0, g16.tobytes(), 2)
    save("exif6_77x41.jpg", Image.fromarray(picture(77, 41, 19)), "JPEG", quality=90, exif=exif_bytes(6))
    save("exif5_45x30.jpg", Image.fromarray(picture(45, 30, 20)), "JPEG", quality=90, exif=exif_bytes(5))
    for o in (2, 3, 4, 7):                               # decode-only: the other orientations
        save(f"exif{o}_23x14.jpg", Image.fromarray(picture(23, 14, 30 + o)), "JPEG", quality=90,
             exif=exif_bytes(o))
    save("exif8_60x35.png", Image.fromarray(picture(60, 35, 21)), "PNG", exif=exif_bytes(8))
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description '
                  'tiff:Orientation="3"/></x:xmpmeta>', zip=True)
    save("xmp3_52x29.png", Image.fromarray(picture(52, 29, 22)), "PNG", pnginfo=info)
    save("rgb_200x150.png", Image.fromarray(picture(200, 150, 23)), "PNG")
    files.update(chunk_cases())
    return files


def tiff_orientation(typ, count, payload, big=False):
    """An EXIF blob (TIFF header, IFD0 of one Orientation entry of the given type and count)
    whose value bytes are payload: inline when 4 bytes or fewer, else after the IFD."""
    e = ">" if big else "<"
    head = (b"MM\0*" if big else b"II*\0") + struct.pack(e + "I", 8)
    if len(payload) <= 4:
        value = payload.ljust(4, b"\0")
        tail = b""
    else:
        value = struct.pack(e + "I", 8 + 2 + 12 + 4)
        tail = payload
    return head + struct.pack(e + "H", 1) + struct.pack(e + "HHI", 0x0112, typ, count) + value + b"\0\0\0\0" + tail


def chunk_cases():
    """PNG chunks Pillow reads its own way (libpng would drop or refuse them) and EXIF
    orientations of other numeric types: name -> bytes. Those Pillow refuses are named
    refuse_*; main() checks that it does."""
    import zlib

    def chunk(t, d, crc=None):
        c = zlib.crc32(t + d) & 0xFFFFFFFF if crc is None else crc
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", c)

    def png(w, h, depth, ctype, pix, bpp, before=(), after=()):
        stride = w * bpp
        raw = b"".join(b"\0" + pix[y * stride:(y + 1) * stride] for y in range(h))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
                + b"".join(before) + chunk(b"IDAT", zlib.compress(raw, 9)) + b"".join(after) + chunk(b"IEND", b""))

    out = {}
    idx = (picture(20, 20, 40, 1) // 26).astype(np.uint8)            # indices 0..9
    plte = chunk(b"PLTE", bytes(picture(10, 1, 41).reshape(-1)))
    alpha = bytes((i * 53 + 7) % 256 for i in range(256))
    out["pal_trns256_20x20.png"] = png(20, 20, 8, 3, idx.tobytes(), 1, before=(plte, chunk(b"tRNS", alpha)))
    out["pal_trnsfirst_20x20.png"] = png(20, 20, 8, 3, idx.tobytes(), 1, before=(chunk(b"tRNS", alpha[:10]), plte))
    # indices 6..9 past a 6-entry PLTE (an error in the PNG spec): Pillow, libpng and
    # browsers take the file, such a pixel black and opaque
    plte6 = chunk(b"PLTE", bytes(picture(6, 1, 46).reshape(-1)))
    out["pal_pastplte_20x20.png"] = png(20, 20, 8, 3, idx.tobytes(), 1, before=(plte6, chunk(b"tRNS", alpha[:4])))
    gray = picture(20, 20, 42, 1)
    gray[3, 4] = 44
    out["gray_key300_20x20.png"] = png(20, 20, 8, 0, gray.tobytes(), 1, before=(chunk(b"tRNS", struct.pack(">H", 300)),))
    out["gray_trns4_20x20.png"] = png(20, 20, 8, 0, gray.tobytes(), 1,
                                      before=(chunk(b"tRNS", struct.pack(">HH", int(gray[0, 0]), 7)),))
    rgb = picture(20, 20, 43)
    k = [int(v) for v in rgb[2, 3]]
    out["rgb_keyhigh_20x20.png"] = png(20, 20, 8, 2, rgb.tobytes(), 3,
                                       before=(chunk(b"tRNS", struct.pack(">HHH", *(v + 256 for v in k))),))
    rgb = picture(30, 20, 44)
    six = tiff_orientation(3, 1, struct.pack("<H", 6))
    out["exifprefix_30x20.png"] = png(30, 20, 8, 2, rgb.tobytes(), 3, before=(chunk(b"eXIf", b"Exif\0\0" + six),))
    out["exiflast_30x20.png"] = png(30, 20, 8, 2, rgb.tobytes(), 3, before=(chunk(b"eXIf", six),),
                                    after=(chunk(b"eXIf", tiff_orientation(3, 1, struct.pack("<H", 3))),))
    out["exifbadcrc_30x20.png"] = png(30, 20, 8, 2, rgb.tobytes(), 3, after=(chunk(b"eXIf", six, crc=1),))
    out["critical_30x20.png"] = png(30, 20, 8, 2, rgb.tobytes(), 3, before=(chunk(b"ABCD", b"xyz"),))
    p = png(30, 20, 8, 2, rgb.tobytes(), 3)
    at = p.index(b"IDAT") - 4
    n = struct.unpack(">I", p[at:at + 4])[0]
    out["idatcrc_30x20.png"] = p[:at + 8 + n] + b"\0\0\0\0" + p[at + 12 + n:]
    out["refuse_crc_before_idat.png"] = png(30, 20, 8, 2, rgb.tobytes(), 3, before=(chunk(b"tEXt", b"a\0b", crc=1),))
    out["refuse_trns1_20x20.png"] = png(20, 20, 8, 0, gray.tobytes(), 1, before=(chunk(b"tRNS", b"\x05"),))
    pic = Image.fromarray(picture(45, 61, 45))
    for name, typ, cnt, payload in (("sshort", 8, 1, struct.pack("<h", 6)), ("slong", 9, 1, struct.pack("<i", 6)),
                                    ("rational", 5, 1, struct.pack("<II", 12, 2)),
                                    ("float", 11, 1, struct.pack("<f", 6.0)),
                                    ("short3", 3, 3, struct.pack("<HHH", 6, 1, 1)),
                                    ("rational65", 5, 1, struct.pack("<II", 13, 2))):
        buf = io.BytesIO()
        pic.save(buf, "JPEG", quality=90, exif=tiff_orientation(typ, cnt, payload))
        out[f"exif{name}_45x61.jpg"] = buf.getvalue()
    return out


def png_raw(w, h, depth, color_type, data, bytes_per_pixel):
    import zlib
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    stride = w * bytes_per_pixel
    raw = b"".join(b"\0" + data[y * stride:(y + 1) * stride] for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def reference_rgb(data):
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return im, convert_to_rgb(im, return_numpy=True)


def pillow_resizes_as_the_engine():
    """Pillow 13 runs a resize's vertical pass first when the height shrinks by more than
    twice the width's pixels (engine/io/image_preprocess.c); older Pillow always went
    horizontal first, which rounds the 8-bit intermediate otherwise: goldens made with it
    would not be the engine's."""
    import PIL
    major = int(PIL.__version__.split(".")[0])
    if major < 13:
        sys.exit(f"Pillow {PIL.__version__}: the goldens need Pillow 13 or later (the resize pass order)")


def main():
    pillow_resizes_as_the_engine()
    os.makedirs(OUT, exist_ok=True)
    lines = []
    files = make_inputs()
    chunk_case_names = set(chunk_cases())   # decode and resize records only
    for name, data in sorted(files.items()):
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        if name.startswith("refuse_"):
            try:
                reference_rgb(data)
            except Exception as e:   # noqa: BLE001  (Pillow's own exception types vary)
                lines.append(f"refuse {name}")
                print(f"{name}: Pillow refuses it ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            sys.exit(f"{name}: Pillow opened it; it was made to be refused")
        im, rgb = reference_rgb(data)
        h, w = rgb.shape[:2]
        lines.append(f"decode {name} {w} {h} {digest(w, h, rgb.tobytes())}")
        for rw, rh in ((w * 3 // 7 + 1, h * 5 // 9 + 1), (w * 2 + 3, h + 11), (28, 56)):
            res = np.array(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=None))
            lines.append(f"resize {name} {rw} {rh} {digest(rw, rh, res.tobytes())}")
        if name.endswith("_23x14.jpg") or name in chunk_case_names:
            continue
        configs = [SMALL] + ([DEFAULT] if name in ("rgb_200x150.png", "rgb_640x427.jpg", "rgb_1000x29.png") else [])
        for mn, mx in configs:
            proc = Qwen2VLImageProcessorPil(min_pixels=mn, max_pixels=mx)
            out = proc(images=im, return_tensors="np")
            pv = np.asarray(out["pixel_values"], dtype=np.float32)
            gt, gh, gw = (int(v) for v in out["image_grid_thw"][0])
            assert pv.shape == (gt * gh * gw, 1176), pv.shape
            assert np.array_equal(pv.reshape(-1, 3, 2, 196)[:, :, 0], pv.reshape(-1, 3, 2, 196)[:, :, 1])
            d = digest(1568, pv.shape[0], pv.astype("<f4").tobytes())
            bin_name = "-"
            if (mn, mx) == SMALL or name == "rgb_200x150.png":
                bin_name = f"{name}.{mx}.f32"
                half = pv.reshape(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588)
                with open(os.path.join(OUT, bin_name), "wb") as f:
                    f.write(half.astype("<f4").tobytes())
            lines.append(f"patches {name} {mn} {mx} {gt} {gh} {gw} {d} {bin_name}")
    import PIL
    import transformers
    with open(os.path.join(OUT, "manifest.txt"), "w") as f:
        f.write("# made by tools/reference/make_image_goldens.py; see its docstring\n")
        f.write(f"# Pillow {PIL.__version__}, transformers {transformers.__version__}\n")
        f.write("\n".join(lines) + "\n")
    print(f"{len(files)} images, {len(lines)} records", file=sys.stderr)


if __name__ == "__main__":
    main()
