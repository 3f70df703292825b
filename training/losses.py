"""Training objectives: contrastive (CLIP), KD to a frozen teacher, Target-CMLI (seed 004, eq. 7-10)
and, optionally, FILIP-style contrastive on CMLI scores so that token vectors learn to rerank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.cmli import cmli_i2t_matrix, cmli_pairs, cmli_t2i_matrix


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows, with gradient flowing back to each rank's own part; and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


class ContrastiveLoss(torch.nn.Module):
    """Symmetric InfoNCE over all ranks' negatives; the temperature is the model's `logit_scale`,
    clamped at 100 as in CLIP. Labels are offset by the rank's position in the gathered batch."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        scale = logit_scale.exp().clamp(max=100.0)
        all_image, offset = gather_with_grad(image)
        all_text, _ = gather_with_grad(text)
        labels = torch.arange(image.shape[0], device=image.device) + offset
        logits_i2t = scale * image @ all_text.T
        logits_t2i = scale * text @ all_image.T
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def cmli_contrastive_loss(
    patches: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """FILIP's objective on the local batch: InfoNCE where the similarity of (text, image) is the
    CMLI score (seed 004, eq. 3 and 4) instead of the CLS cosine."""
    scale = logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(patches.shape[0], device=patches.device)
    t2i = cmli_t2i_matrix(tokens, token_mask, patches)
    i2t = cmli_i2t_matrix(tokens, token_mask, patches)
    return (F.cross_entropy(scale * t2i, labels) + F.cross_entropy(scale * i2t, labels)) / 2


def standardise(target: torch.Tensor) -> torch.Tensor:
    """Teacher features have arbitrary scale; regress their per-vector standardised form."""
    return F.layer_norm(target.float(), target.shape[-1:])


def kd_loss(pred_image: torch.Tensor, pred_text: torch.Tensor, teacher_global: torch.Tensor) -> torch.Tensor:
    """MSE to the teacher's global vector for the image and for its caption, mean of the two."""
    target = standardise(teacher_global)
    return (F.mse_loss(pred_image.float(), target) + F.mse_loss(pred_text.float(), target)) / 2


def target_cmli_loss(
    image_patch_pred: torch.Tensor,
    text_token_pred: torch.Tensor,
    token_mask: torch.Tensor,
    teacher_patches: torch.Tensor,
    student_tokens: torch.Tensor,
    student_patches: torch.Tensor,
) -> torch.Tensor:
    """Target-CMLI (seed 004, eq. 7-10).

    image_patch_pred: the student's patches in teacher space, pooled to the teacher's grid [B, n, D];
    text_token_pred: the student's tokens in teacher space [B, M, D]; token_mask excludes CLS, SEP
    and padding. student_tokens [B, M, P] and student_patches [B, n, P] (pooled to the same grid):
    the student's own CMLI vectors, which choose each token's target. Patches regress their teacher
    patch in place (eq. 7); text token j regresses the teacher patch at m_j^{t2i} (eq. 9), which eq. 2
    defines as the argmax over the *student's* patches of the student's token-patch similarity, not
    the teacher patch nearest the token's prediction; the KD loss is the mean of the two (eq. 10)."""
    target = standardise(teacher_patches)
    l_i2t = F.mse_loss(image_patch_pred.float(), target)
    with torch.no_grad():  # an index: eq. 9 has no gradient through the choice
        _, _, best = cmli_pairs(
            F.normalize(student_tokens.float(), dim=-1), token_mask, F.normalize(student_patches.float(), dim=-1)
        )
    chosen = torch.gather(target, 1, best[..., None].expand(-1, -1, target.shape[-1]))
    per_token = ((text_token_pred.float() - chosen) ** 2).mean(-1)
    l_t2i = (per_token * token_mask).sum() / token_mask.sum().clamp_min(1.0)
    return (l_i2t + l_t2i) / 2


def pooled_patches(hidden_patches: torch.Tensor, grid: int, target_n: int) -> torch.Tensor:
    """Average-pool the student's patch grid down to the teacher's grid (16x16 -> 7x7)."""
    b, _n, d = hidden_patches.shape
    side = round(target_n**0.5)
    x = hidden_patches.transpose(1, 2).reshape(b, d, grid, grid)
    return F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2)


class Objective:
    """One weighted term of the training loss: `objective(img, txt, logit_scale, idx)` is its value
    on a batch (idx: the batch's training-image indices, for the teacher's cached targets)."""

    name = ""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, img, txt, logit_scale: torch.Tensor, idx) -> torch.Tensor:
        raise NotImplementedError


class Contrastive(Objective):
    name = "contrastive"

    def __init__(self, weight: float) -> None:
        super().__init__(weight)
        self.loss = ContrastiveLoss()

    def __call__(self, img, txt, logit_scale, idx):
        return self.loss(img.cls.float(), txt.cls.float(), logit_scale)


class TeacherKD(Objective):
    name = "kd"

    def __init__(self, weight: float, teacher_global: torch.Tensor) -> None:
        super().__init__(weight)
        self.teacher_global = teacher_global

    def __call__(self, img, txt, logit_scale, idx):
        return kd_loss(img.kd, txt.kd, self.teacher_global[idx].to(img.cls.device))


class TargetCMLI(Objective):
    name = "target_cmli"

    def __init__(self, weight: float, teacher_patches: torch.Tensor, kd_head: torch.nn.Module, grid: int) -> None:
        super().__init__(weight)
        self.teacher_patches, self.kd_head, self.grid = teacher_patches, kd_head, grid

    def __call__(self, img, txt, logit_scale, idx):
        n = self.teacher_patches.shape[1]
        pooled = pooled_patches(img.hidden[:, 1:], self.grid, n)
        own = pooled_patches(img.patches, self.grid, n)  # the student's own vectors choose the targets (eq. 9)
        teacher = self.teacher_patches[idx].to(img.cls.device)
        return target_cmli_loss(
            self.kd_head(pooled), self.kd_head(txt.hidden), txt.token_mask, teacher, txt.tokens, own
        )


class CMLIContrastive(Objective):
    name = "cmli_contrastive"

    def __call__(self, img, txt, logit_scale, idx):
        return cmli_contrastive_loss(img.patches.float(), txt.tokens.float(), txt.token_mask.float(), logit_scale)


def build_objectives(weights, model, grid: int, teacher_targets: tuple | None) -> list[Objective]:
    """The terms `weights` (training/config.py LossWeights) switches on; contrastive always (its weight
    may be 0, it is still logged). teacher_targets: (global [I, D], patches [I, n, D]) or None."""
    objectives: list[Objective] = [Contrastive(weights.contrastive)]
    if weights.kd > 0:
        objectives.append(TeacherKD(weights.kd, teacher_targets[0]))
    if weights.target_cmli > 0:
        objectives.append(TargetCMLI(weights.target_cmli, teacher_targets[1], model.kd_head, grid))
    if weights.cmli_contrastive > 0:
        objectives.append(CMLIContrastive(weights.cmli_contrastive))
    return objectives
