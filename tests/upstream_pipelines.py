"""Each family's upstream inference pipeline, written the way its script writes it (test-only).

The lines below call the libraries the upstream scripts call — scikit-image, scipy.ndimage,
torchvision, Pillow, OpenCV, segment-anything — with the same arguments, so a test can hold
samedge's numpy preprocessing and postprocessing against them. Sources (read for this):
CVPR24_LiteMedSAM_infer.py and MedSAM_Inference.py (bowang-lab/MedSAM); segment_anything's
SamPredictor; SAMed utils.test_single_volume and preprocess/preprocess_data.py; MA-SAM
MA_SAM/test.py and datasets/dataset.py; Med-SA dataset/__init__.py and function.py (validation_sam);
SAM-Adapter datasets/wrappers.py (ValDataset) and models/sam.py (infer).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from scipy.ndimage import zoom
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import transform

SAM_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
SAM_STD = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
SAMED_HU = (-125, 275)
MASAM_HU, MASAM_MEAN, MASAM_STD = (-200, 250), 50.21997497685108, 68.47153712416372
MEDSA_3D_HU = (-175, 250)
FLOAT_NOISE = 1e-4  # how far from flipping a decision float32 rounding alone can leave a pixel


def litemedsam_input(img_3c: np.ndarray) -> np.ndarray:
    """CVPR24_LiteMedSAM_infer: resize_longest_side (cv2 INTER_AREA), min-max, pad to 256."""
    h, w = img_3c.shape[:2]
    scale = 256 / max(h, w)
    new = (int(h * scale + 0.5), int(w * scale + 0.5))
    img_256 = cv2.resize(img_3c, new[::-1], interpolation=cv2.INTER_AREA)
    img_256 = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), 1e-8, None)
    padded = np.pad(img_256, ((0, 256 - new[0]), (0, 256 - new[1]), (0, 0)))
    return padded.transpose(2, 0, 1)[None].astype(np.float32)


def sam_input(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """SamPredictor.set_image → Sam.preprocess: ResizeLongestSide, (x − mean) / std, pad."""
    resized = ResizeLongestSide(size).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).float()
    x = (x - SAM_MEAN) / SAM_STD
    x = F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
    return x[None].numpy()


def medsam_input(img_3c: np.ndarray) -> np.ndarray:
    """MedSAM_Inference.py, verbatim steps."""
    img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True,
                                anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(),
                                                     a_min=1e-8, a_max=None)
    return torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0).numpy()


def medsam_mask(low_res_logits: torch.Tensor, H: int, W: int) -> np.ndarray:
    """MedSAM_Inference.medsam_inference after the decoder."""
    low_res_pred = torch.sigmoid(low_res_logits)
    low_res_pred = F.interpolate(low_res_pred, size=(H, W), mode="bilinear", align_corners=False)
    return low_res_pred.numpy() > 0.5


def sam_masks(low_res: torch.Tensor, size: int, resized_hw, H: int, W: int,
              sigmoid: bool = False) -> np.ndarray:
    """Sam.postprocess_masks (bilinear to S², crop the padding, bilinear to (H, W)), then
    SamPredictor's ``> 0`` on logits, or CVPR24_LiteMedSAM_infer's ``sigmoid > 0.5``."""
    masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    masks = masks[..., : resized_hw[0], : resized_hw[1]]
    masks = F.interpolate(masks, (H, W), mode="bilinear", align_corners=False)
    return (torch.sigmoid(masks) > 0.5).numpy() if sigmoid else (masks > 0).numpy()


def decision_margin(scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """How far each pixel's decision is from flipping: ``|score - threshold|`` for a mask,
    best minus second-best over axis 1 for a label map. Pixels whose margin is below what the
    graphs' own difference can move are the only ones two pipelines may label differently."""
    if threshold is not None:
        return np.abs(scores - threshold)
    top = np.sort(scores, axis=1)
    return top[:, -1] - top[:, -2]


def samed_margin(masks: torch.Tensor, x: int, y: int) -> np.ndarray:
    """SAMed's decision margin at the input size, carried to (x, y) by its order-0 label zoom."""
    margin = decision_margin(masks.numpy())
    return np.stack([item if (x, y) == item.shape else
                     zoom(item, (x / item.shape[0], y / item.shape[1]), order=0)
                     for item in margin])


def masam_margin(masks: torch.Tensor, x: int, y: int) -> np.ndarray:
    """MA-SAM's decision margin: between the two best zoomed probabilities."""
    return decision_margin(np.moveaxis(masam_probabilities(masks, x, y), -1, 1))


def graph_bound(logit_error: float) -> float:
    """The margin a pixel needs so that two logit maps ``logit_error`` apart cannot label it
    differently: resizing (bilinear ≤ 1, cubic spline ≤ ~1.6) and softmax/sigmoid (≤ 1) move a
    score by at most that much, and a two-way decision by twice it."""
    return 4 * logit_error + FLOAT_NOISE


def assert_agree_where_decided(got: np.ndarray, want: np.ndarray, margin: np.ndarray,
                               bound: float, undecided_max: float = 0.02) -> None:
    """Every pixel whose ``margin`` exceeds ``bound`` carries upstream's label; the rest (where
    float noise or the graphs' measured difference may tip the decision) stay a small share —
    up to ~1 % for the tests' random-weight models, whose logits are flat."""
    assert got.shape == want.shape == margin.shape, (got.shape, want.shape, margin.shape)
    decided = margin > bound
    differ = (got != want) & decided
    assert not differ.any(), f"{int(differ.sum())} decided pixels differ (bound {bound:.2e})"
    assert 1 - decided.mean() <= undecided_max, f"{1 - decided.mean():.2%} undecided"


def medsa_2d_input(image: np.ndarray, size: int, era: str) -> np.ndarray:
    """dataset/__init__.py transform_test on a PIL RGB image (+ ×255 and net.preprocess in 2025)."""
    steps = [T.Resize((size, size)), T.ToTensor()]
    if era == "2025":
        steps.append(T.Lambda(lambda x: x * 255))
    x = T.Compose(steps)(Image.fromarray(image).convert("RGB"))
    if era == "2025":
        x = (x - SAM_MEAN) / SAM_STD
    return x[None].numpy()


def medsa_3d_input(volume01: np.ndarray, size: int, era: str) -> np.ndarray:
    """function.validation_sam's thd branch: (b d) c h w, ×3 channels, tensor Resize. Both eras
    pinned torchvision 0.13.1, whose tensor Resize does not antialias."""
    imgs = torch.from_numpy(volume01.astype(np.float32))[:, None].repeat(1, 3, 1, 1)
    imgs = T.Resize((size, size), antialias=False)(imgs)
    if era == "2025":
        imgs = (imgs - SAM_MEAN) / SAM_STD
    return imgs.numpy()


def medsa_masks(low_res: torch.Tensor, H: int, W: int, era: str) -> np.ndarray:
    """validation_sam: logits straight to the output size (legacy nearest, 2025 bilinear);
    eval_seg thresholds — legacy raw logits (0.5 of its five), 2025 sigmoid > 0.5."""
    if era == "legacy":
        return F.interpolate(low_res, size=(H, W)).numpy() > 0.5
    pred = F.interpolate(low_res, size=(H, W), mode="bilinear", align_corners=False)
    return torch.sigmoid(pred).numpy() > 0.5


def sam_adapter_input(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """ValDataset's img_transform on the PIL RGB image."""
    steps = T.Compose([T.Resize((size, size)), T.ToTensor(),
                       T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    return steps(Image.fromarray(image).convert("RGB"))[None].numpy()


def hu_of(path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def samed_slice(hu: np.ndarray) -> np.ndarray:
    """preprocess/preprocess_data.py: float32, clip, (x − a_min) / (a_max − a_min)."""
    a_min, a_max = SAMED_HU
    image = np.clip(hu.astype(np.float32), a_min, a_max)
    return (image - a_min) / (a_max - a_min)


def samed_input(slice: np.ndarray, input_size: int, patch_size: int) -> np.ndarray:
    """utils.test_single_volume, the per-slice zooms."""
    x, y = slice.shape[0], slice.shape[1]
    if x != input_size or y != input_size:
        slice = zoom(slice, (input_size / x, input_size / y), order=3)
    new_x, new_y = slice.shape[0], slice.shape[1]
    if new_x != patch_size or new_y != patch_size:
        slice = zoom(slice, (patch_size / new_x, patch_size / new_y), order=3)
    inputs = torch.from_numpy(slice).unsqueeze(0).unsqueeze(0).float()
    return inputs.repeat(1, 3, 1, 1).numpy()


def samed_labels(masks: torch.Tensor, x: int, y: int) -> np.ndarray:
    """utils.test_single_volume after ``net``: argmax of the softmax, order-0 zoom back."""
    out = torch.argmax(torch.softmax(masks, dim=1), dim=1).numpy()
    return np.stack([item if (x, y) == item.shape else
                     zoom(item, (x / item.shape[0], y / item.shape[1]), order=0) for item in out])


def masam_stack(image_arr: np.ndarray) -> np.ndarray:
    """MA_SAM/test.py's per-pickle steps on an (H, W, 5) HU stack."""
    HU_min, HU_max = MASAM_HU
    image_arr = np.clip(image_arr, HU_min, HU_max)
    image_arr = (image_arr - HU_min) / (HU_max - HU_min) * 255.0
    return masam_normalized(image_arr)


def masam_normalized(image_arr: np.ndarray) -> np.ndarray:
    """test.py from the 0–255 stage on: float32, standardise, min-max over the stack."""
    image_arr = np.float32(image_arr)
    image_arr = (image_arr - MASAM_MEAN) / MASAM_STD
    return (image_arr - image_arr.min()) / (image_arr.max() - image_arr.min() + 0.00000001)


def masam_input(stack: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, 5) normalised stack → (5, 3, S, S): zoom with order 3 where not S (test.py's call
    only runs at S; datasets/dataset.py zooms (S/x, S/y, 1.0), which is what this uses)."""
    x, y = stack.shape[:2]
    if x != patch_size or y != patch_size:
        stack = zoom(stack, (patch_size / x, patch_size / y, 1.0), order=3)
    inputs = torch.from_numpy(stack).unsqueeze(0).unsqueeze(0).float()
    inputs = inputs.repeat(1, 3, 1, 1, 1)
    return torch.permute(inputs, (0, -1, 1, 2, 3))[0].numpy()


def masam_probabilities(masks: torch.Tensor, x: int, y: int) -> np.ndarray:
    """test.py's per-window part: softmax, order-3 zoom to the slice size, (D, x, y, K+1)."""
    out_pred = torch.permute(torch.softmax(masks, dim=1), (0, 2, 3, 1)).numpy()
    out_h, out_w = out_pred.shape[1:3]
    if x != out_h or y != out_w:
        out_pred = zoom(out_pred, (1.0, x / out_h, y / out_w, 1.0), order=3)
    return out_pred


def masam_volume_probabilities(window_masks: list[torch.Tensor], x: int, y: int) -> np.ndarray:
    """test.py's test_single_volume over the windows centred on slices 0..N-1: each window's
    zoomed softmax added to the slices it covers (a zero-padded copy, D // 2 slices each end;
    upstream's D is 5), divided by counts that start at one; (N, x, y, K+1)."""
    count, depth = len(window_masks), window_masks[0].shape[0]
    half = depth // 2
    probability = None
    for ind, masks in enumerate(window_masks):
        out_pred = masam_probabilities(masks, x, y)
        if probability is None:
            probability = np.zeros((count + 2 * half, *out_pred.shape[1:]), np.float32)
            avg_cnt = np.ones_like(probability)
        probability[ind: ind + depth] += out_pred
        avg_cnt[ind: ind + depth] += 1.0
    return (probability / avg_cnt)[half: half + count]


def masam_labels(masks: torch.Tensor, x: int, y: int) -> np.ndarray:
    """argmax of ``masam_probabilities`` (the average over overlapping windows is volume-level
    and not part of one stack's answer)."""
    return np.argmax(masam_probabilities(masks, x, y), axis=-1)
