# Production-shaped state: an AWS ElastiCache (Redis OSS) replication group
# in cluster mode with TLS, and the brokers on an EKS cluster pointed at it.
# The URL (it holds the auth token) goes into a Secret, not into the spec.

terraform {
  required_version = ">= 1.3"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = ">= 2.12, < 3.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.23"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5"
    }
  }
}

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "eks_cluster_name" {
  description = "The EKS cluster the brokers run on."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the cluster's VPC for the cache."
  type        = list(string)
}

variable "security_group_ids" {
  description = "Security groups letting the cluster's nodes reach port 6379."
  type        = list(string)
}

provider "aws" {
  region = var.region
}

data "aws_eks_cluster" "this" {
  name = var.eks_cluster_name
}

data "aws_eks_cluster_auth" "this" {
  name = var.eks_cluster_name
}

provider "kubernetes" {
  host                   = data.aws_eks_cluster.this.endpoint
  cluster_ca_certificate = base64decode(data.aws_eks_cluster.this.certificate_authority[0].data)
  token                  = data.aws_eks_cluster_auth.this.token
}

provider "helm" {
  kubernetes {
    host                   = data.aws_eks_cluster.this.endpoint
    cluster_ca_certificate = base64decode(data.aws_eks_cluster.this.certificate_authority[0].data)
    token                  = data.aws_eks_cluster_auth.this.token
  }
}

resource "random_password" "redis" {
  length  = 48
  special = false
}

resource "aws_elasticache_subnet_group" "cirrus" {
  name       = "cirrus-mqtt"
  subnet_ids = var.subnet_ids
}

resource "aws_elasticache_replication_group" "cirrus" {
  replication_group_id       = "cirrus-mqtt"
  description                = "Cirrus MQTT broker state"
  engine                     = "redis"
  engine_version             = "7.1"
  node_type                  = "cache.r7g.large"
  port                       = 6379
  parameter_group_name       = "default.redis7.cluster.on"
  num_node_groups            = 3
  replicas_per_node_group    = 1
  automatic_failover_enabled = true
  multi_az_enabled           = true
  transit_encryption_enabled = true
  at_rest_encryption_enabled = true
  auth_token                 = random_password.redis.result
  subnet_group_name          = aws_elasticache_subnet_group.cirrus.name
  security_group_ids         = var.security_group_ids
}

resource "kubernetes_namespace_v1" "mqtt" {
  metadata {
    name = "mqtt"
  }
}

resource "kubernetes_secret_v1" "redis_url" {
  metadata {
    name      = "cirrus-redis-url"
    namespace = kubernetes_namespace_v1.mqtt.metadata[0].name
  }

  data = {
    url = "rediss://:${random_password.redis.result}@${aws_elasticache_replication_group.cirrus.configuration_endpoint_address}:6379"
  }
}

module "cirrus" {
  source = "../../modules/cirrus"

  namespace        = kubernetes_namespace_v1.mqtt.metadata[0].name
  create_namespace = false
  redis = {
    url_secret_name = kubernetes_secret_v1.redis_url.metadata[0].name
    url_secret_key  = "url"
    cluster         = true
  }
  autoscaling = {
    min_replicas               = 3
    max_replicas               = 30
    target_connections_per_pod = 50000
  }
  service = {
    type = "LoadBalancer"
    annotations = {
      "service.beta.kubernetes.io/aws-load-balancer-type"   = "nlb"
      "service.beta.kubernetes.io/aws-load-balancer-scheme" = "internet-facing"
    }
  }
  users = {
    devices = {
      acl = [{ topic = "devices/%u/#", access = "all" }]
    }
  }
}

output "endpoints" {
  value = module.cirrus.endpoints
}
