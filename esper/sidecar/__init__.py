"""The Kasmina sync sidecar: a process beside the trainer that keeps a shared volume in step with
the Kernels the pod asked for (sync, its config, the volume's index, the health server) and the
injector that adds it to a workload. Never imports torch: the sidecar image needs none.
"""
