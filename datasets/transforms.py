"""Image transforms shared by the training and PCA-learning scripts (one place for the paper's constants)."""
from __future__ import annotations

import random

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
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


# ---- replayable views (--teacher_cache): each random choice drawn once, stored, and applied again -----------------
# The draws are those of the transforms above, in the same order and from the same RNGs (torch for the torchvision
# steps, Python's random for the blur radius), so a stored view is a sample of exactly the training distribution;
# ``apply`` then makes the same pixels from the parameters alone.

class ReplayableView:
    """A view's random choices as a float vector: ``sample(img)`` draws them, ``apply(img, params)`` makes the view."""

    n_params: int

    def sample(self, img) -> list[float]:
        raise NotImplementedError

    def apply(self, img, params):
        raise NotImplementedError


class GLDView(ReplayableView):
    """``gld_train_transform``: [i, j, h, w] of RandomResizedCrop(0.4-1), then a horizontal flip (0/1)."""

    n_params = 5

    def __init__(self, imsize: int) -> None:
        self.size = int(imsize)
        self.crop = T.RandomResizedCrop(self.size, scale=(0.4, 1.0))
        self.finish = T.Compose([T.ToTensor(), imagenet_normalize()])

    def sample(self, img) -> list[float]:
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        return [i, j, h, w, float(torch.rand(1) < 0.5)]

    def apply(self, img, params):
        i, j, h, w, flip = (int(v) for v in params)
        img = TF.resized_crop(img, i, j, h, w, [self.size, self.size], self.crop.interpolation, antialias=True)
        return self.finish(TF.hflip(img) if flip else img)


class SVDView(ReplayableView):
    """``svd_augment``: crop [i, j, h, w]; colour jitter applied, its order (4) and factors (4); grayscale; blur and
    its radius; solarize; flip."""

    n_params = 18

    def __init__(self, crop_size: int = 224, blur_p: float = 0.5, solarize_p: float = 0.0) -> None:
        self.size = int(crop_size)
        self.crop = T.RandomResizedCrop(self.size, scale=(0.4, 1.0))
        self.jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
        self.blur_p, self.solarize_p = blur_p, solarize_p
        self.finish = T.Compose([T.ToTensor(), imagenet_normalize()])

    def sample(self, img) -> list[float]:
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        jitter = not 0.8 < torch.rand(1)  # RandomApply's test
        order, b, c, s, hue = self.jitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                     self.jitter.saturation, self.jitter.hue) if jitter else \
            (torch.arange(4), 1.0, 1.0, 1.0, 0.0)
        gray = bool(torch.rand(1) < 0.2)
        blur = not self.blur_p < torch.rand(1)
        sigma = random.uniform(0.1, 2.0) if blur else 0.0
        solarize = self.solarize_p > 0 and not self.solarize_p < torch.rand(1)
        flip = bool(torch.rand(1) < 0.5)
        return [i, j, h, w, float(jitter), *map(float, order.tolist()), b, c, s, hue, float(gray), float(blur),
                sigma, float(solarize), float(flip)]

    def apply(self, img, params):
        i, j, h, w = (int(v) for v in params[:4])
        jitter, order, (b, c, s, hue) = params[4], [int(v) for v in params[5:9]], params[9:13]
        gray, blur, sigma, solarize, flip = params[13:18]
        img = TF.resized_crop(img, i, j, h, w, [self.size, self.size], self.crop.interpolation, antialias=True)
        if jitter:
            for fn in order:
                img = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][fn](
                    img, [b, c, s, hue][fn])
        if gray:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
        if solarize:
            img = ImageOps.solarize(img)
        return self.finish(TF.hflip(img) if flip else img)


def svd_distill_views(crop_size: int = 224) -> tuple[SVDView, SVDView]:
    """The two distillation views' distributions (``svd_distill_transform``)."""
    return SVDView(crop_size, blur_p=1.0), SVDView(crop_size, blur_p=0.1, solarize_p=0.2)
