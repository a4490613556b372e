# Two brokers on one cluster, served by one operator: the first module
# installs the operator, the second only declares its broker. Each broker
# has its own namespace, Redis, users and Service.
#
#   terraform init
#   terraform apply -target=module.first.helm_release.operator   # CRDs first
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

module "first" {
  source = "../../modules/cirrus"

  namespace   = "mqtt-factory"
  broker_name = "factory"
  redis       = { managed = true }
  resources = {
    requests = { cpu = "500m", memory = "512Mi" }
    limits   = { memory = "1Gi" }
  }
  users = {
    plc = { acl = [{ topic = "factory/%u/#", access = "all" }] }
  }
}

module "second" {
  source = "../../modules/cirrus"

  install_operator = false

  namespace   = "mqtt-fleet"
  broker_name = "fleet"
  redis       = { managed = true }
  tls         = { enabled = true }
  listeners   = { mqtt = 0, mqtts = 8883 }
  node_selector = {
    "kubernetes.io/os" = "linux"
  }
  pod_template = {
    priorityClassName = "mqtt-critical"
    topologySpreadConstraints = [{
      maxSkew           = 1
      topologyKey       = "topology.kubernetes.io/zone"
      whenUnsatisfiable = "ScheduleAnyway"
      labelSelector     = { matchLabels = { "app.kubernetes.io/instance" = "fleet" } }
    }]
  }
  drain   = { connectionsPerSecond = 100, timeoutSeconds = 60 }
  rollout = { minReadySeconds = 10 }

  depends_on = [module.first]
}

output "factory" {
  value = module.first.endpoints
}

output "fleet" {
  value = module.second.endpoints
}
