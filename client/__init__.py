"""The merchant side: Flower ClientApp, local DP training, `fedanom client` and `fedanom score`."""
