"""SVD (Short Video Dataset) near-duplicate video retrieval: metadata, frame/video datasets, evaluation."""
from datasets.svd.eval import SIM_FNS, average_precision_at_k, video_descriptors, video_similarity
from datasets.svd.meta import SVDMeta, SVDMetaError

__all__ = ["SIM_FNS", "SVDMeta", "SVDMetaError", "average_precision_at_k", "video_descriptors", "video_similarity"]
