#!/bin/bash
# LLaVA-NeXT sqa evaluation with pruning: the v1.5 workflow with v1.6 defaults (see _defaults.sh).
source "$(dirname "${BASH_SOURCE[0]}")/_defaults.sh"
exec bash "$V15/sqa.sh" "$@"
