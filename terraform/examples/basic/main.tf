# A broker with TLS from the operator's CA, a managed (development) Redis,
# autoscaling, and two users, on the cluster of the current kubeconfig.
#
#   terraform init
#   terraform apply -target=module.cirrus.helm_release.operator   # CRDs first
#   terraform apply

terraform {
  required_version = ">= 1.3"

  required_providers {
    helm = {
      source  = "hashicorp/helm"
      version = ">= 2.12, < 3.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.23"
    }
  }
}

variable "kubeconfig" {
  description = "Path of the kubeconfig to use."
  type        = string
  default     = "~/.kube/config"
}

provider "kubernetes" {
  config_path = var.kubeconfig
}

provider "helm" {
  kubernetes {
    config_path = var.kubeconfig
  }
}

module "cirrus" {
  source = "../../modules/cirrus"

  namespace = "mqtt"
  redis     = { managed = true }
  tls       = { enabled = true }
  autoscaling = {
    min_replicas               = 2
    max_replicas               = 6
    target_connections_per_pod = 20000
  }

  users = {
    alice = {
      acl = [{ topic = "sensors/#", access = "all" }]
    }
    dashboard = {
      username = "dash"
      acl = [
        { topic = "sensors/#", access = "subscribe" },
        { topic = "sensors/private/#", access = "all", permission = "deny" },
      ]
    }
  }
}

output "endpoints" {
  value = module.cirrus.endpoints
}

output "user_secrets" {
  value = module.cirrus.user_secrets
}

output "ca_secret" {
  value = module.cirrus.ca_secret
}
