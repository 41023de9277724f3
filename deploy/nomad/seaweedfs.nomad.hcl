# Object storage for snapshots: SeaweedFS (`weed mini`, the version deploy/seaweedfs.sh
# pins) in Docker, S3 on port 8333, its data in the client's host volume
# `nullspace-seaweedfs`. Configure identities (-s3.config) before exposing it.
#
#   nomad job run deploy/nomad/seaweedfs.nomad.hcl

job "nullspace-seaweedfs" {
  type        = "service"
  datacenters = ["*"]

  group "seaweedfs" {
    count = 1

    network {
      port "s3" {
        static = 8333
      }
    }

    volume "data" {
      type      = "host"
      source    = "nullspace-seaweedfs"
      read_only = false
    }

    service {
      name     = "nullspace-seaweedfs"
      port     = "s3"
      provider = "nomad"
      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "seaweedfs" {
      driver = "docker"

      config {
        image      = "chrislusf/seaweedfs:4.48"
        network_mode = "host"
        entrypoint = ["weed"]
        args = [
          "mini", "-dir=/data", "-ip=${NOMAD_IP_s3}", "-ip.bind=0.0.0.0",
          "-master.telemetry=false", "-s3.port=8333", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
      }

      volume_mount {
        volume      = "data"
        destination = "/data"
      }

      kill_timeout = "60s"

      resources {
        cpu    = 1000
        memory = 2048
      }
    }
  }
}
