"""Steps that make the embedded data: the digit splits, the VQ tokenizer, every image's codes, the classifier."""
from __future__ import annotations

from pathlib import Path

import torch

from varkd.checkpoints import load_vq, save_model
from varkd.classifier import Classifier, accuracy, classifier_loss
from varkd.codes import save_code_set
from varkd.config import ClassifierJob, ExtractCodesJob, PrepareDataJob, TokenizerJob, to_yaml
from varkd.data import SPLITS, load_digits, read_split, save_splits
from varkd.images import to_model_input
from varkd.loop import BatchOrder, train
from varkd.models.vq import VQModel
from varkd.tokenizer import reconstruction_mse, tokenizer_loss


def prepare_data(job: PrepareDataJob, device: torch.device) -> None:
    splits = load_digits(job.data)
    save_splits(job.out, splits)
    print(f"{job.out}: " + " / ".join(f"{len(s)} {name}" for name, s in splits.items())
          + f" images {splits['train'].images.shape[1:]}")


def _train_images(images: str, model: torch.nn.Module, optim, out_dir: str, config_text: str, seed: int,
                  loss, eval_fn, device: torch.device, desc: str) -> dict:
    """Shared by the tokenizer and the classifier: minibatches of the train split through `loss`."""
    split = read_split(images, "train")
    x, y = to_model_input(split.images), torch.from_numpy(split.labels)
    order = BatchOrder(len(x), optim.batch_size, seed)

    def loss_fn(step: int):
        index = order(step)
        return loss(model, x[index].to(device), y[index].to(device))

    return train(model, loss_fn, optim, out_dir, config_text=config_text, eval_fn=eval_fn, device=device, desc=desc)


def train_tokenizer(job: TokenizerJob, device: torch.device) -> None:
    """The VQ tokenizer (LlamaGen architecture); held-out reconstruction MSE is logged. A collapsed codebook fails
    the job (tokenizer.min_codebook_usage) before anything downstream trains on it."""
    cfg = job.tokenizer
    torch.manual_seed(cfg.seed)  # the initial weights too: a job is a function of its config
    model = VQModel(cfg.model).to(device)
    val = read_split(job.images, "val")
    summary = _train_images(job.images, model, cfg.optim, job.out_dir, to_yaml(job), cfg.seed,
                            lambda m, x, y: tokenizer_loss(m, x), lambda: {"val_rec_mse": reconstruction_mse(model, val.images)},
                            device, "tokenizer")
    used = len(torch.unique(model.encode_to_codes(read_split(job.images, "train").images)))
    summary["codes_used"] = used
    usage = used / cfg.model.codebook_size
    if usage < cfg.min_codebook_usage:
        raise ValueError(f"the tokenizer collapsed: {used} of {cfg.model.codebook_size} codes ({usage:.2f}) in use on "
                         f"the training images, below tokenizer.min_codebook_usage={cfg.min_codebook_usage}; every "
                         "model of the study would see a few codes. Change tokenizer.seed or tokenizer.optim and "
                         f"rerun (its training log: {Path(job.out_dir) / 'train_log.csv'})")
    save_model(Path(job.out_dir) / "tokenizer.pt", model, cfg.model, train=summary)
    (Path(job.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    print(f"tokenizer: held-out reconstruction MSE {summary['val_rec_mse']:.4f}, {used} of "
          f"{cfg.model.codebook_size} codes used")


def extract_codes(job: ExtractCodesJob, device: torch.device) -> None:
    """Codes of every image, one code set per split (out_dir/train, val, test): [N, A, T] with each image's A views."""
    vq = load_vq(job.tokenizer).to(device)
    for split in SPLITS:
        images = read_split(job.images, split)
        codes = vq.encode_to_codes(images.images, job.batch_size)
        used = len(torch.unique(codes))
        save_code_set(Path(job.out_dir) / split, codes.view(-1, images.views, codes.shape[1]).numpy(),
                      images.labels[:: images.views], vq.config.codebook_size)
        print(f"codes {split}: {len(images) // images.views} images x {images.views} views x {codes.shape[1]} codes, "
              f"{used} of {vq.config.codebook_size} codes used")


def train_classifier(job: ClassifierJob, device: torch.device) -> None:
    """The metric's feature network, trained on the train split; held-out accuracy is logged."""
    torch.manual_seed(job.seed)  # the initial weights too: a job is a function of its config
    model = Classifier(job.classifier.model).to(device)
    val = read_split(job.images, "val")
    summary = _train_images(job.images, model, job.classifier.optim, job.out_dir, to_yaml(job), job.seed,
                            classifier_loss, lambda: {"val_acc": accuracy(model, val.images, val.labels)},
                            device, "classifier")
    save_model(Path(job.out_dir) / "classifier.pt", model, job.classifier.model, train=summary)
    (Path(job.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    print(f"classifier: held-out accuracy {summary['val_acc']:.4f}")
