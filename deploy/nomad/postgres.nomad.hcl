# The shared catalog: one PostgreSQL (15 or newer) in Docker, its data in the client's
# host volume `nullspace-postgres` (client config: host_volume "nullspace-postgres").
# The password comes from the Nomad Variable nomad/jobs/nullspace-postgres (key
# password); the pool managers' catalog URL is
# postgres://nullspace:PASSWORD@HOST:5432/nullspace.
#
#   nomad var put nomad/jobs/nullspace-postgres password=...
#   nomad job run deploy/nomad/postgres.nomad.hcl

job "nullspace-postgres" {
  type        = "service"
  datacenters = ["*"]

  group "postgres" {
    count = 1

    network {
      port "postgres" {
        static = 5432
      }
    }

    volume "data" {
      type      = "host"
      source    = "nullspace-postgres"
      read_only = false
    }

    service {
      name     = "nullspace-postgres"
      port     = "postgres"
      provider = "nomad"
      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "postgres" {
      driver = "docker"

      config {
        image = "postgres:16-bookworm"
        ports = ["postgres"]
      }

      volume_mount {
        volume      = "data"
        destination = "/var/lib/postgresql/data"
      }

      env {
        POSTGRES_USER = "nullspace"
        POSTGRES_DB   = "nullspace"
        PGDATA        = "/var/lib/postgresql/data/pgdata"
      }

      template {
        destination = "secrets/postgres.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/nullspace-postgres" }}POSTGRES_PASSWORD={{ .password }}{{ end }}
          EOT
      }

      kill_timeout = "60s"

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
