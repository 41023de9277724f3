# The public API: the component under stock `wasmtime serve` (the version
# deploy/install-wasmtime-cli.sh installs), on the clients that run a pool manager. Its
# upstream is the pool manager on the same client (any host answers any request), given
# to the component at run time: `-Scli` (wasi:cli/environment) and
# `--env NULLSPACE_UPSTREAM=...`.
#
#   nomad job run deploy/nomad/api.nomad.hcl

variable "wasmtime" {
  description = "The wasmtime CLI on every client"
  type        = string
  default     = "/usr/local/bin/wasmtime"
}

variable "component" {
  description = "The API component (deploy/build-component.sh) on every client"
  type        = string
  default     = "/usr/local/share/nullspace/nullspace-api.wasm"
}

variable "count" {
  type    = number
  default = 2
}

job "nullspace-api" {
  type        = "service"
  datacenters = ["*"]

  constraint {
    attribute = "${meta.nullspace_pool}"
    value     = "true"
  }

  update {
    max_parallel     = 1
    min_healthy_time = "10s"
    healthy_deadline = "5m"
    auto_revert      = true
  }

  group "api" {
    count = var.count

    network {
      port "http" {}
    }

    service {
      name     = "nullspace-api"
      port     = "http"
      provider = "nomad"
      check {
        type     = "http"
        path     = "/api/v1/health"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "api" {
      # exec: chrooted as nobody; /usr (so /usr/local) is in the chroot.
      driver = "exec"

      config {
        command = var.wasmtime
        args = [
          "serve",
          "-Scli",
          "--addr", "${NOMAD_ADDR_http}",
          "--env", "NULLSPACE_UPSTREAM=http://${attr.unique.network.ip-address}:7070",
          var.component,
        ]
      }

      kill_timeout = "30s"

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
