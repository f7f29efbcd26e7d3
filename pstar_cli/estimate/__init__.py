"""Memory estimates for a config (`pstar estimate-memory`): the workload and its activations
(workload), each system's needs (systems), the machine (hardware)."""

from pstar_cli.estimate.hardware import detect_gpu, detect_hardware
from pstar_cli.estimate.systems import (estimate_report, estimate_systems, largest_trainable,
                                        pstar_bytes_per_param, pstar_estimate, pytorch_estimate, zero2_offload_estimate,
                                        zero3_offload_estimate)
from pstar_cli.estimate.workload import (GIB, Hardware, Side, SystemEstimate, Workload, activation_bytes,
                                         largest_layer_params, layer_activation_bytes,
                                         llama_layer_activation_bytes, workload_from_config)

__all__ = ["GIB", "Hardware", "Side", "SystemEstimate", "Workload", "activation_bytes", "detect_gpu",
           "detect_hardware", "estimate_report", "estimate_systems", "largest_trainable",
           "largest_layer_params", "layer_activation_bytes", "llama_layer_activation_bytes", "pstar_bytes_per_param", "pstar_estimate",
           "pytorch_estimate", "workload_from_config", "zero2_offload_estimate", "zero3_offload_estimate"]
