"""AntiPureEvaluate: score one experiment, append it to a results table in the output folder, draw the comparison."""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io, ui
from ..antipure_comfy.evaluate import evaluate_run


class AntiPureEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureEvaluate",
            display_name="AntiPure Evaluate",
            category="AntiPure",
            description="Score a protect → purify → customize → generate experiment: perceptibility of the "
                        "perturbation (PSNR, SSIM, L∞/L2, LPIPS) and the distortion it leaves (BRISQUE, grid "
                        "artifacts, face detection failure, identity similarity, CLIP-IQA, FID of generated vs "
                        "clean). Appends one row per run to <output>/<filename_prefix>.json/.csv; Evaluate nodes "
                        "with different labels and the same prefix build one comparison table and plot.",
            inputs=[
                io.Image.Input("clean", tooltip="The original, unprotected images: the reference for every "
                                                "comparison and the identity for face metrics."),
                io.String.Input("label", default="antipure",
                                tooltip="Name of this run's group in the results file, e.g. the method "
                                        "('antipure', 'advdm', 'mist eta=8'). Runs with the same label are "
                                        "averaged in the comparison table and plot."),
                io.String.Input("filename_prefix", default="antipure/results",
                                tooltip="Results file in the output folder, without extension: "
                                        "<prefix>.json and <prefix>.csv. Use the same prefix in several "
                                        "Evaluate nodes to compare their labels."),
                io.Boolean.Input("faces", default=True,
                                 tooltip="Face metrics (detection failure rate, identity similarity). Turn off "
                                         "for art-style experiments. Need dlib-bin + face-recognition-models "
                                         "(requirements-metrics.txt), else scikit-image's detector, else "
                                         "reported as not available."),
                io.Int.Input("patch_size", default=8, min=2, max=64,
                             tooltip="Grid period in pixels for grid_score / hf_ratio (8 = the SD VAE's "
                                     "latent cell)."),
                io.Image.Input("protected", optional=True,
                               tooltip="The protected images, same count and size as clean: perceptibility of "
                                       "the perturbation. Optional weights: LPIPS needs torchvision's "
                                       "alexnet-owt-7be5be79.pth and lpips_alex_v0.1.pth in models/antipure/."),
                io.Image.Input("purified", optional=True,
                               tooltip="The attacker's purified images, same count as clean (resized to clean's "
                                       "size for PSNR/SSIM): how much of the protection survived."),
                io.Image.Input("generated", optional=True,
                               tooltip="Images sampled from the model customized on the (purified) images, any "
                                       "count and size. Optional weights in models/antipure/: arcface.onnx "
                                       "(needs onnxruntime) for ArcFace identity, a transformers CLIP folder "
                                       "clip/ (needs transformers) for CLIP-IQA, the FID Inception weights "
                                       "pt_inception-2015-12-05-6726825d.pth (needs torch-fidelity) for FID "
                                       "against clean (2+ images in each)."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Markdown report: this run's metrics, why any "
                                                                "are missing, and every label in the results file."),
                io.Image.Output(display_name="plot", tooltip="clean | protected | purified | generated strip above "
                                                             "one bar chart per metric, one bar per label."),
            ],
            is_output_node=True,
            not_idempotent=True,  # each node appends its own row, even with inputs identical to another's
        )

    @classmethod
    def execute(cls, clean, label, filename_prefix, faces, patch_size, protected=None, purified=None,
                generated=None) -> io.NodeOutput:
        report, plot, metrics = evaluate_run(clean, label, filename_prefix, faces, patch_size, protected, purified,
                                             generated)
        # "metrics" in the UI output: the headless runner reads it for its results table
        return io.NodeOutput(report, plot, ui={**ui.PreviewText(report).as_dict(),
                                               **ui.PreviewImage(plot, cls=cls).as_dict(), "metrics": [metrics]})
