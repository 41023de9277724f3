# The pool manager on every Nomad client that opts in (client meta nullspace_pool =
# "true"), as a system job: raw_exec (it runs as root: KVM, taps, nftables, network
# namespaces, cgroups), on the host's network, its host ID the node's name.
#
# Stopping the task drains the host first (its sandboxes move to the other hosts, live;
# `admin host drain --wait-s`), then stops the daemon; kill_timeout covers both. A new
# start makes the host ready again. The catalog URL and S3 credentials come from the
# Nomad Variable nomad/jobs/nullspace-pool-manager (keys catalog, s3_access_key,
# s3_secret_key); the S3 endpoint is the service seaweedfs.nomad.hcl registers:
# docs/DEPLOY.md.
#
#   nomad var put nomad/jobs/nullspace-pool-manager catalog=postgres://... s3_access_key=... s3_secret_key=...
#   nomad job run -var preview_domain=preview.example.com deploy/nomad/pool-manager.nomad.hcl

variable "bin_dir" {
  description = "Where the release binaries are on every client"
  type        = string
  default     = "/usr/local/bin"
}

variable "state_dir" {
  type    = string
  default = "/var/lib/nullspace"
}

variable "preview_domain" {
  description = "Preview URLs are <port>-<sandbox>.PREVIEW_DOMAIN"
  type        = string
  default     = "preview.nullspace.example.com"
}

variable "public_url" {
  description = "The public API's origin as browsers reach it: dashboard links point there, and the data plane allows the dashboard's calls from there only"
  type        = string
  default     = "https://api.nullspace.example.com"
}

variable "s3_bucket" {
  type    = string
  default = "nullspace"
}

variable "drain_wait_s" {
  description = "Longest a stop waits for the host to drain before the daemon stops anyway"
  type        = number
  default     = 540
}

job "nullspace-pool-manager" {
  type        = "system"
  datacenters = ["*"]

  constraint {
    attribute = "${meta.nullspace_pool}"
    value     = "true"
  }

  # One host at a time; each stop drains its host first.
  update {
    max_parallel     = 1
    min_healthy_time = "60s"
    healthy_deadline = "20m"
  }

  group "pool-manager" {
    network {
      port "control" {
        static = 7070
      }
      port "edge" {
        static = 7071
      }
      port "preview" {
        static = 7072
      }
    }

    service {
      name     = "nullspace-control"
      port     = "control"
      provider = "nomad"
      check {
        type     = "http"
        path     = "/v1/health"
        interval = "10s"
        timeout  = "3s"
      }
    }

    service {
      name     = "nullspace-edge"
      port     = "edge"
      provider = "nomad"
      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
    }

    service {
      name     = "nullspace-preview"
      port     = "preview"
      provider = "nomad"
      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "pool-manager" {
      driver = "raw_exec"

      # The drain (drain_wait_s) and the daemon's own stop (its VMs end) fit in.
      kill_signal  = "SIGTERM"
      kill_timeout = "10m"

      config {
        command = "/bin/sh"
        args = ["-c", <<-SCRIPT
          pm=${var.bin_dir}/nullspace-pool-manager
          "$pm" admin host undrain "$HOST_ID" --state-dir "$STATE_DIR" ||
            echo "host $HOST_ID is not registered yet: its first start" >&2
          "$pm" serve --state-dir "$STATE_DIR" \
            --host-id "$HOST_ID" --advertise-host "$HOST_IP" \
            --listen "$HOST_IP:7070" --edge-listen "$HOST_IP:7071" --preview-listen "$HOST_IP:7072" \
            --preview-domain "$PREVIEW_DOMAIN" --public-url "$PUBLIC_URL" --snapshot-store s3 \
            --s3-endpoint "$S3_ENDPOINT" --s3-bucket "$S3_BUCKET" --on-exit end &
          daemon=$!
          drain_then_stop() {
            "$pm" admin host drain "$HOST_ID" --state-dir "$STATE_DIR" \
              --wait-s "$DRAIN_WAIT_S" || echo "host $HOST_ID did not drain in $DRAIN_WAIT_S s: stopping anyway" >&2
            kill -TERM "$daemon"
          }
          trap drain_then_stop TERM INT
          status=0
          wait "$daemon" || status=$?
          # A trapped signal ends the first wait; wait for the daemon's own stop.
          if kill -0 "$daemon" 2>/dev/null; then status=0; wait "$daemon" || status=$?; fi
          exit "$status"
          SCRIPT
        ]
      }

      env {
        HOST_ID          = "${node.unique.name}"
        HOST_IP          = "${attr.unique.network.ip-address}"
        STATE_DIR        = var.state_dir
        PREVIEW_DOMAIN   = var.preview_domain
        PUBLIC_URL       = var.public_url
        S3_BUCKET        = var.s3_bucket
        DRAIN_WAIT_S     = var.drain_wait_s
        NULLSPACE_CACHE   = "/var/cache/nullspace"
        NULLSPACE_RUN_DIR = "/dev/shm/nullspace"
      }

      template {
        destination = "secrets/nullspace.env"
        env         = true
        # A re-render (SeaweedFS rescheduled, a variable put) must not restart every
        # pool manager at once: they would all drain with nowhere to move to. The next
        # start of each task reads the new values.
        change_mode = "noop"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/nullspace-pool-manager" }}
          NULLSPACE_CATALOG={{ .catalog }}
          AWS_ACCESS_KEY_ID={{ .s3_access_key }}
          AWS_SECRET_ACCESS_KEY={{ .s3_secret_key }}
          {{ end }}
          {{ range nomadService "nullspace-seaweedfs" }}S3_ENDPOINT=http://{{ .Address }}:{{ .Port }}
          {{ end }}
          EOT
      }

      # What the daemon itself needs; its VMs live in cgroups of their own.
      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
