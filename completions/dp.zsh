
#compdef dp

_dp_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _DP_COMPLETE=complete_zsh dp)
}

compdef _dp_completion dp

