"""Image transforms shared by the training and PCA-learning scripts (one place for the paper's constants)."""
from __future__ import annotations

import random

import torchvision.transforms as T
from PIL import ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize() -> T.Normalize:
    return T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def gld_train_transform(imsize: int) -> T.Compose:
    """GLDv2 distillation and PCA learning, as the paper: RandomResizedCrop(0.4-1), HFlip, ToTensor, Normalize.

    DELG/DOLG's RGB->BGR reordering happens inside those teachers, so one transform serves every teacher.
    """
    if imsize is None or int(imsize) <= 0:
        raise ValueError(f"--imsize must be a positive integer, got {imsize!r}")
    return T.Compose([
        T.RandomResizedCrop(int(imsize), scale=(0.4, 1.0)),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        imagenet_normalize(),
    ])


# ---- SVD (video) transforms: the paper's distillation, PCA and test pipelines -------------------------------

class PILGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from ``sigma`` (python ``random``), as the paper's SVD code."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """``PIL.ImageOps.solarize`` with its default threshold 128 (BYOL's solarisation)."""

    def __call__(self, img):
        return ImageOps.solarize(img)


def svd_augment(crop_size: int = 224, blur_p: float = 0.5, solarize_p: float = 0.0) -> T.Compose:
    """The SVD frame augmentation: RRC(0.4-1), ColorJitter(0.4,0.4,0.2,0.1) p0.8, Grayscale p0.2, blur, solarize,
    HFlip, ToTensor, Normalize. Distillation view 1: blur 1.0; view 2: blur 0.1 + solarize 0.2; PCA: 0.5 + 0.2."""
    steps = [T.RandomResizedCrop(int(crop_size), scale=(0.4, 1.0)),
             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
             T.RandomGrayscale(p=0.2),
             T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=blur_p)]
    if solarize_p > 0:
        steps.append(T.RandomApply([PILSolarize()], p=solarize_p))
    steps += [T.RandomHorizontalFlip(p=0.5), T.ToTensor(), imagenet_normalize()]
    return T.Compose(steps)


class TwoViews:
    """Two independently augmented views of one image (SVD distillation: the positives are the two views)."""

    def __init__(self, view1, view2) -> None:
        self.view1, self.view2 = view1, view2

    def __call__(self, img):
        return self.view1(img), self.view2(img)


def svd_distill_transform(crop_size: int = 224) -> TwoViews:
    return TwoViews(svd_augment(crop_size, blur_p=1.0), svd_augment(crop_size, blur_p=0.1, solarize_p=0.2))


def svd_pca_transform(crop_size: int = 224) -> T.Compose:
    return svd_augment(crop_size, blur_p=0.5, solarize_p=0.2)


def svd_test_transform(input_norm: str = "none", crop_size: int = 224) -> T.Compose:
    """Resize(256) + CenterCrop(224) + ToTensor; the paper has no Normalize here (B15): ``imagenet`` adds it."""
    if input_norm not in ("none", "imagenet"):
        raise ValueError(f"--input_norm must be 'none' or 'imagenet', got {input_norm!r}")
    steps = [T.Resize(round(int(crop_size) * 256 / 224)), T.CenterCrop(int(crop_size)), T.ToTensor()]
    if input_norm == "imagenet":
        steps.append(imagenet_normalize())
    return T.Compose(steps)
